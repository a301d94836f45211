"""RAML v1.0 model cards and Hub pushes, tested offline against a loopback mock of the Hub HTTP API."""

import base64
import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants

from transformers_rxt.hub import (
    GATED_DESCRIPTIONS,
    RAML_LICENSE_NAME,
    RAML_LICENSE_URL,
    RxTCardValidationError,
    build_model_card,
    check_remote_code,
    count_parameters,
    describe_architecture,
    push_rxt_to_hub,
    save_hub_ready,
    validate_model_card,
)

from rxt_factories import interaction_batch, story_tokenizer, tiny_model

VOCAB = 300
MOE = dict(use_moe=True, num_experts=6, moe_top_k=2, num_shared_experts=1, shared_expert_dim=40,
           use_head_norm=True, head_norm_type="rms_norm", stateless_layers_config=["dense"], dense_layer_dim=40)
MEMORY = dict(variant="self-interlayer", use_gated_residual=True, residual_gate_type="elementwise",
              use_tanh_residual_gate=False)
CODE_FILES = {"configuration_rxt.py", "modeling_rxt.py", "cache_rxt.py"}
STAGES = [
    {"stage": "joint-pretraining", "dataset": "roneneldan/TinyStories", "steps": 1200, "tokens": 3_500_000},
    {"stage": "smat", "dataset": ["ReactiveAI/TinyStories-MRL"], "steps": 80, "final_loss": 2.25},
]
EVAL = {"memory_retention": {1: 0.875, 4: 0.5}, "tensorbleu_reward": 0.3125, "perplexity": 7.5}


# ============================================================================================== fixtures
@pytest.fixture(scope="module")
def tokenizer():
    return story_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def moe_model():
    model = tiny_model(seed=1, vocab=VOCAB, decoder=MOE, memory=MEMORY)
    with torch.no_grad():  # move every weight off its init value so that a wrong load cannot pass
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


class MockHub:
    """A loopback stand-in for the Hub endpoints used by create_repo, update_repo_settings, model_info and
    create_commit.

    Every file is answered "regular" at preupload, so even safetensors arrive inline (base64) in the commit
    payload and no LFS/xet transfer is attempted. `calls` records (method, path, auth header) in order;
    `repos` holds each repository's state ({"private": ..., "gated": False | "auto" | "manual"}).
    """

    def __init__(self):
        self.calls, self.settings, self.commits, self.files, self.validated = [], [], [], {}, []
        self.repos = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, payload, headers=()):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _read(self):
                size = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(size) if size else b""

            def _record(self):
                hub.calls.append((self.command, self.path.split("?")[0], self.headers.get("authorization")))
                return self.path.split("?")[0]

            def do_POST(self):
                path, body = self._record(), self._read()
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request['organization']}/{request['name']}" if request.get("organization") \
                        else f"user/{request['name']}"
                    hub.created = request
                    hub.repos.setdefault(repo, {"private": request.get("visibility") == "private", "gated": False})
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo}", "name": repo})
                if path == "/api/validate-yaml":  # create_commit asks the Hub to check README.md's metadata
                    hub.validated.append(json.loads(body))
                    return self._reply(200, {})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    repo = path[len("/api/models/"):].split("/commit/")[0]
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                             for line in lines if line["key"] == "file"}
                    hub.commits.append({"repo": repo, "header": lines[0]["value"], "files": files})
                    hub.files.setdefault(repo, {}).update(files)
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{'0' * 40}",
                                             "commitOid": "0" * 40, "pullRequestUrl": None})
                return self._reply(404, {"error": f"mock hub: no route for POST {path}"})

            def do_PUT(self):
                path, body = self._record(), self._read()
                if path.endswith("/settings"):
                    hub.settings.append((path, json.loads(body)))
                    repo = path[len("/api/models/"):-len("/settings")]
                    if repo not in hub.repos:
                        return self._reply(404, {"error": "no such repo"}, [("X-Error-Code", "RepoNotFound")])
                    hub.repos[repo].update(json.loads(body))
                    return self._reply(200, {})
                return self._reply(404, {"error": f"mock hub: no route for PUT {path}"})

            def do_GET(self):
                path = self._record()
                repo = path[len("/api/models/"):]
                if path.startswith("/api/models/") and repo in hub.repos:  # model_info
                    return self._reply(200, {"id": repo, **hub.repos[repo]})
                if path.startswith("/api/models/"):
                    return self._reply(404, {"error": "Repository not found"}, [("X-Error-Code", "RepoNotFound")])
                return self._reply(404, {"error": "not found"}, [("X-Error-Code", "EntryNotFound")])

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def requests(self):
        return [(method, path) for method, path, _ in self.calls]

    def assert_gated_before_upload(self, repo: str, mode: str) -> None:
        """The repository's gating was set to `mode` before its first upload, and its card states that mode."""
        order = self.requests()
        gate = order.index(("PUT", f"/api/models/{repo}/settings"))
        first_upload = min(i for i, (_, path) in enumerate(order) if path.startswith(f"/api/models/{repo}/preupload"))
        assert gate < first_upload, order
        assert self.repos[repo]["gated"] == mode
        card = validate_model_card(self.files[repo]["README.md"].decode(), gated=mode)  # card agrees with the repo
        assert card.data.gated is True and card.data.license_name == RAML_LICENSE_NAME
        assert card.data.license_link == RAML_LICENSE_URL and RAML_LICENSE_URL in self.files[repo]["LICENSE"].decode()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    # conftest turns offline mode on for the whole suite; only these loopback requests may go out.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setenv("HF_TOKEN", "hf_mock_write_token")
    server = MockHub()
    yield server
    server.close()


def _reference_outputs(model, path):
    # One thread here and in the remote process (_load_remotely): with two, an AVX-512 CPU's matmul kernels split
    # the sums differently in the two processes (6e-8 apart), and what is checked is the code and the weights.
    ids, mask = interaction_batch(vocab=model.config.vocab_size, seed=3)
    stm = model.init_memory(2, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, stm=stm).logits
    finally:
        torch.set_num_threads(threads)
    torch.save({"ids": ids, "mask": mask, "stm": stm.memory, "logits": logits}, path)


def _load_remotely(model_dir: Path, ref_path: Path, tmp_path: Path) -> str:
    """Load `model_dir` in a fresh interpreter where transformers_rxt cannot be imported; run the card's usage."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["transformers_rxt"] = None  # any import of the package fails
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(model_dir)!r}
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        ref = torch.load({str(ref_path)!r})
        torch.set_num_threads(1)  # as _reference_outputs
        with torch.no_grad():
            out = model(input_ids=ref["ids"], attention_mask=ref["mask"], stm=ref["stm"]).logits
        print("MAXDIFF", (out - ref["logits"]).abs().max().item())
        # the usage section of the card, verbatim in spirit (tests/test_readme.py runs it verbatim)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        stm = model.init_memory(batch_size=1)
        before = stm.memory.clone()
        for query in ["the red fox", "what did the fox find"]:
            prompt = tokenizer.apply_chat_template([{{"role": "user", "content": query}}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
            output = model.generate(**prompt, stm=stm, max_new_tokens=5, do_sample=False)
            tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        stm.wait()
        print("STM_UPDATED", bool((stm.memory != before).any()), type(stm).__name__)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# ============================================================================================== card
def test_card_has_every_raml_metadata_field(moe_model, tokenizer):
    card = build_model_card(moe_model, repo_id="rxt-org/RxT-Tiny", tokenizer=tokenizer, stages=STAGES,
                            eval_results=EVAL, base_model="rxt-org/RxT-Tiny-Base", tags=["my-tag"])
    data = card.data.to_dict()
    assert data["license"] == "other" and data["license_name"] == RAML_LICENSE_NAME
    assert data["license_link"].startswith("https://")
    assert data["pipeline_tag"] == "text-generation" and data["library_name"] == "transformers"
    assert data["language"] == ["en"]
    assert data["base_model"] == "rxt-org/RxT-Tiny-Base"
    # datasets default to the ones the stage records name
    assert data["datasets"] == ["roneneldan/TinyStories", "ReactiveAI/TinyStories-MRL"]
    for tag in ("RxT", "ReactiveTransformer", "Event-Driven", "MemorySystem", "ShortTermMemory",
                "MixtureOfExperts", "SparseQueryAttention", "my-tag"):
        assert tag in data["tags"]
    assert data["gated"] is True
    assert "RAML" in data["extra_gated_prompt"] and "non-commercial" in data["extra_gated_prompt"]
    for key in ("extra_gated_heading", "extra_gated_description", "extra_gated_button_content"):
        assert isinstance(data[key], str) and data[key]
    fields = data["extra_gated_fields"]
    assert fields["Company"] == "text" and fields["Country"] == "country"
    purpose = fields["I want to use this model for"]
    assert purpose["type"] == "select"
    assert purpose["options"] == ["Research", "Education", {"label": "Other", "value": "other"}]
    checkboxes = [k for k, v in fields.items() if v == "checkbox"]
    assert checkboxes == ["I agree to use this model for non-commercial purposes only"]
    # the YAML block is real YAML with the same content
    front = card.content.split("---")[1]
    assert yaml.safe_load(front)["extra_gated_fields"] == fields


def test_card_architecture_numbers_equal_the_config(moe_model, tokenizer):
    config = moe_model.config
    dec, enc, mem = config.decoder_options, config.encoder_options, config.memory_attention_options
    arch = describe_architecture(moe_model)
    assert arch["dim"] == config.hidden_size == dec.embed_dim
    assert arch["memory_layers"] == dec.num_layers and arch["decoder_layers"] == dec.num_layers + 1
    assert arch["att_heads"] == dec.att_heads
    assert (arch["decoder"]["self_attention"]["query_heads"], arch["decoder"]["self_attention"]["kv_heads"]) \
        == dec.self_attention_heads()
    assert (arch["decoder"]["cross_attention"]["query_heads"], arch["decoder"]["cross_attention"]["kv_heads"]) \
        == dec.cross_attention_heads()
    assert arch["decoder"]["ffn"]["experts"] == 6 and arch["decoder"]["ffn"]["active_experts"] == 2
    assert arch["decoder"]["ffn"]["dim"] == dec.ff_dim and arch["encoder"]["ffn"]["dim"] == enc.ff_dim
    assert arch["memory_attention"]["variant"] == mem.variant
    assert arch["stm"] == {"layers": dec.num_layers, "slots": config.stm_size, "dim": config.hidden_size}
    assert arch["interaction_length"] == config.max_interaction_length
    assert arch["vocab_size"] == config.vocab_size == VOCAB

    body = build_model_card(moe_model, repo_id="rxt-org/RxT-Tiny", tokenizer=tokenizer).text
    hq, hkv = dec.self_attention_heads()
    expected_lines = [
        f"- Hidden dim: {config.hidden_size}",
        f"- Attention heads: {dec.att_heads} (head width {dec.head_dim})",
        f"  - self-attention: symmetric Sparse Query Attention (sSQA), query/key-value heads {hq}/{hkv} of {dec.att_heads}",
        "  - Mixture-of-Experts feed-forward: 6 experts, 2 active per token, plus 1 shared expert (dim 40)",
        f"  - expert FFN: SwiGLU feed-forward with {dec.ff_dim} dim",
        f"  - feed-forward: SwiGLU feed-forward with {enc.ff_dim} dim",
        "  - variant: Gated Self/Interlayer Memory Attention (`self-interlayer`)",
        "  - residual gate: elementwise residual gate with sigmoid activation (per STM slot",
        "  - RMSNorm before the LM head",
        f"- Vocabulary: {VOCAB} tokens (the tokenizer defines {len(tokenizer)}, with the RxT chat template)",
        f"- Interaction (query + answer) length: {config.max_interaction_length} tokens",
        f"- STM size: {dec.num_layers} layers × {config.stm_size} slots × {config.hidden_size} dim",
        "- Positions: RoPE (base 10000)",
        'repo = "rxt-org/RxT-Tiny"',
    ]
    for line in expected_lines:
        assert line in body, line


def test_parameter_counts_per_component_and_moe_active(moe_model):
    counts = count_parameters(moe_model)
    assert counts["total"]["total"] == sum(p.numel() for p in moe_model.parameters())
    assert sum(counts[k]["total"] for k in ("embedding", "decoder", "encoder", "memory_attention")) \
        == counts["total"]["total"]
    assert counts["embedding"]["total"] == VOCAB * 32
    assert counts["memory_attention"]["total"] == sum(p.numel() for p in moe_model.memory_attention.parameters())
    # Independent arithmetic: each of the 2 memory layers has 6 routed experts of (32 x 2*48 + 48 x 32) weights;
    # a token uses 2 of them, so 4 experts per layer are inactive. The stateless dense layer is not MoE.
    per_expert = 32 * 2 * 48 + 48 * 32
    inactive = 2 * 4 * per_expert
    assert counts["decoder"]["total"] - counts["decoder"]["active"] == inactive
    assert counts["total"]["total"] - counts["total"]["active"] == inactive
    assert counts["encoder"]["active"] == counts["encoder"]["total"]
    # the same numbers from the config alone (meta device, no weights)
    assert count_parameters(moe_model.config) == counts
    dense = tiny_model(vocab=VOCAB)
    dense_counts = count_parameters(dense)
    assert all(v["total"] == v["active"] for v in dense_counts.values())

    body = build_model_card(moe_model).text
    assert f"| Decoder (incl. LM head) | {counts['decoder']['total']:,} (" in body
    assert f"| {counts['decoder']['active']:,} (" in body
    assert f"| **Total** | {counts['total']['total']:,} (" in body


def test_stages_eval_and_trainer_state(moe_model, tmp_path):
    body = build_model_card(moe_model, stages=STAGES, eval_results=EVAL).text
    assert "| 1 | joint-pretraining | roneneldan/TinyStories | 1,200 | - | 3,500,000 | - |" in body
    assert "| 2 | smat | ReactiveAI/TinyStories-MRL | 80 | - | - | 2.25 |" in body
    assert "| 1 | 0.8750 |" in body and "| 4 | 0.5000 |" in body
    assert "TensorBLEU reward: 0.3125" in body and "| perplexity | 7.5 |" in body

    empty = build_model_card(moe_model).text
    assert "No training run was recorded" in empty and "No evaluation results" in empty

    # a Trainer output directory: the stage comes from trainer_state.json
    state = {"global_step": 42, "epoch": 1.0, "num_input_tokens_seen": 9000,
             "log_history": [{"loss": 3.0, "step": 10}, {"loss": 2.5, "step": 42}, {"train_runtime": 1.0}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    moe_model.config.save_pretrained(tmp_path)
    from_dir = build_model_card(str(tmp_path)).text
    assert "| 1 | training | - | 42 | 1.0 | 9,000 | 2.5 |" in from_dir

    with pytest.raises(ValueError, match="stage record 0"):
        build_model_card(moe_model, stages=[{"dataset": "x/y"}])


def test_card_round_trip_and_validation_errors(moe_model, tokenizer, tmp_path):
    card = build_model_card(moe_model, repo_id="rxt-org/RxT-Tiny", tokenizer=tokenizer, stages=STAGES)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.data.license_name == RAML_LICENSE_NAME and loaded.data.extra_gated_fields["Country"] == "country"
    validate_model_card(tmp_path / "README.md")

    text = card.content
    bad = text.replace("license_name: raml-v1.0", "license_name: apache-2.0").replace("gated: true", "gated: false")
    with pytest.raises(RxTCardValidationError) as error:
        validate_model_card(bad)
    assert "license_name must be 'raml-v1.0'" in str(error.value) and "gated must be True" in str(error.value)
    no_checkbox = text.replace(": checkbox", ": text")
    with pytest.raises(RxTCardValidationError, match="non-commercial-use checkbox"):
        validate_model_card(no_checkbox)
    with pytest.raises(RxTCardValidationError, match="no licence notice"):
        validate_model_card(text.replace("<!-- rxt-card: licence notice -->", ""))
    with pytest.raises(RxTCardValidationError, match="could not be parsed"):
        validate_model_card("---\nlicense: [unclosed\n---\nbody")


def test_card_access_form_states_the_gating_mode(moe_model):
    auto = build_model_card(moe_model)  # the default mode
    manual = build_model_card(moe_model, gated="manual")
    assert auto.data.extra_gated_description == GATED_DESCRIPTIONS["auto"]
    assert manual.data.extra_gated_description == GATED_DESCRIPTIONS["manual"]
    assert auto.data.gated is manual.data.gated is True
    validate_model_card(manual, gated="manual")
    with pytest.raises(RxTCardValidationError, match="extra_gated_description must be .* gated='auto'"):
        validate_model_card(manual, gated="auto")
    with pytest.raises(ValueError, match="gated=False: an RxT model card describes a gated repository"):
        build_model_card(moe_model, gated=False)


# ============================================================================================== local dir
def test_save_hub_ready_writes_a_complete_repository(moe_model, tokenizer, tmp_path):
    out = save_hub_ready(moe_model, tmp_path / "repo", tokenizer, repo_id="rxt-org/RxT-Tiny", stages=STAGES,
                         eval_results=EVAL)
    names = {p.name for p in out.iterdir()}
    assert CODE_FILES <= names
    assert {"config.json", "model.safetensors", "README.md", "LICENSE", "rxt_training_stages.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] \
        == "modeling_rxt.RxTForConversationalGeneration"
    assert "RAML" in (out / "LICENSE").read_text()
    assert json.loads((out / "rxt_training_stages.json").read_text()) == STAGES
    validate_model_card(out / "README.md")
    check_remote_code(out)
    (out / "cache_rxt.py").unlink()  # a file the copied modeling code imports
    with pytest.raises(FileNotFoundError, match="cache_rxt.py"):
        check_remote_code(out)


# ============================================================================================== pushes
ALLOWED_NAMES = CODE_FILES | {"config.json", "generation_config.json", "model.safetensors", "README.md", "LICENSE",
                              "rxt_training_stages.json", "tokenizer.json", "tokenizer_config.json",
                              "chat_template.jinja"}


def test_push_uploads_a_gated_repo_that_loads_offline_with_remote_code(hub, moe_model, tokenizer, tmp_path):
    info = push_rxt_to_hub(moe_model, "rxt-org/RxT-Tiny", tokenizer=tokenizer, endpoint=hub.endpoint,
                           stages=STAGES, eval_results=EVAL)
    assert info.commit_url.startswith(hub.endpoint)
    assert hub.requests() == [("POST", "/api/repos/create"), ("PUT", "/api/models/rxt-org/RxT-Tiny/settings"),
                              ("POST", "/api/validate-yaml"),
                              ("POST", "/api/models/rxt-org/RxT-Tiny/preupload/main"),
                              ("POST", "/api/models/rxt-org/RxT-Tiny/commit/main")]
    assert all(auth == "Bearer hf_mock_write_token" for _, _, auth in hub.calls)
    assert hub.created["visibility"] == "private"
    assert hub.settings == [("/api/models/rxt-org/RxT-Tiny/settings", {"gated": "auto"})]
    hub.assert_gated_before_upload("rxt-org/RxT-Tiny", "auto")
    assert len(hub.commits) == 1 and hub.commits[0]["header"]["summary"] == "Upload RxT model (RAML v1.0)"
    assert "license_name: raml-v1.0" in hub.validated[0]["content"]  # the README the Hub was asked to check
    files = hub.files["rxt-org/RxT-Tiny"]
    assert set(files) == ALLOWED_NAMES
    card = validate_model_card(files["README.md"].decode())
    assert card.data.license_name == RAML_LICENSE_NAME and card.data.datasets == ["roneneldan/TinyStories",
                                                                                 "ReactiveAI/TinyStories-MRL"]
    assert 'repo = "rxt-org/RxT-Tiny"' in card.text
    assert "auto_map" in json.loads(files["config.json"])

    # what the Hub now holds loads in a process that cannot import transformers_rxt, with identical logits
    repo_dir = tmp_path / "downloaded_repo"
    repo_dir.mkdir()
    for name, content in files.items():
        (repo_dir / name).write_bytes(content)
    _reference_outputs(moe_model, tmp_path / "ref.pt")
    stdout = _load_remotely(repo_dir, tmp_path / "ref.pt", tmp_path)
    assert "MAXDIFF 0.0" in stdout
    assert "STM_UPDATED True STMCache" in stdout


def test_push_from_a_directory_uploads_only_the_allow_list(hub, moe_model, tokenizer, tmp_path, caplog):
    out = tmp_path / "run"
    moe_model.save_pretrained(out, max_shard_size="100KB")  # sharded: the index names the weight files
    tokenizer.save_pretrained(out)
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 7, "log_history": [{"loss": 1.5}]}))
    (out / "training_args.bin").write_bytes(b"pickle")
    (out / "optimizer.pt").write_bytes(b"state")
    (out / "mlm_head.safetensors").write_bytes(b"stage-only head")
    (out / "my_private_notes.py").write_text('HF_TOKEN = "hf_secret_do_not_upload"\n')
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "model.safetensors").write_bytes(b"x")
    (out / "README.md").write_text("a hand-written card without the licence")
    shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    with caplog.at_level("WARNING"):
        push_rxt_to_hub(str(out), "rxt-org/from-dir", endpoint=hub.endpoint, gated="manual", private=False,
                        commit_message="stage done")
    files = hub.files["rxt-org/from-dir"]
    assert set(files) == (ALLOWED_NAMES - {"model.safetensors"}) | shards | {"model.safetensors.index.json"}
    assert not any(b"hf_secret_do_not_upload" in content for content in files.values())
    left_out = "checkpoint-7/, mlm_head.safetensors, my_private_notes.py, optimizer.pt, trainer_state.json, " \
               "training_args.bin"
    assert f"Not uploaded to rxt-org/from-dir (not part of the model): {left_out}" in caplog.text
    assert hub.created["visibility"] == "public"
    hub.assert_gated_before_upload("rxt-org/from-dir", "manual")  # public, so gated; the card says "manual"
    body = files["README.md"].decode()
    assert "| 1 | training | - | 7 | - | - | 1.5 |" in body  # the stage came from trainer_state.json


def test_model_push_to_hub_produces_the_raml_card(hub, moe_model, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)  # transformers' own push_to_hub arguments only
    moe_model.push_to_hub("rxt-org/via-method", commit_message="hello", tags=["extra"], private=False)
    assert hub.created["visibility"] == "public"
    hub.assert_gated_before_upload("rxt-org/via-method", "auto")
    files = hub.files["rxt-org/via-method"]
    assert set(files) == ALLOWED_NAMES - {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                          "rxt_training_stages.json"}
    assert "extra" in validate_model_card(files["README.md"].decode()).data.tags
    assert hub.commits[0]["header"]["summary"] == "hello"


def test_keep_gating_keeps_an_existing_mode_and_refuses_a_new_or_ungated_repo(hub, moe_model):
    hub.repos["rxt-org/kept"] = {"private": False, "gated": "manual"}
    push_rxt_to_hub(moe_model, "rxt-org/kept", gated=None, endpoint=hub.endpoint)
    assert hub.requests()[0] == ("GET", "/api/models/rxt-org/kept")  # the mode to keep is read first
    hub.assert_gated_before_upload("rxt-org/kept", "manual")

    hub.calls.clear()
    with pytest.raises(ValueError, match="rxt-org/new does not exist yet and a new repository has no gating to keep"):
        push_rxt_to_hub(moe_model, "rxt-org/new", gated=None, endpoint=hub.endpoint)
    hub.repos["rxt-org/open"] = {"private": False, "gated": False}
    with pytest.raises(ValueError, match="rxt-org/open is not gated on the Hub, so gated=None"):
        push_rxt_to_hub(moe_model, "rxt-org/open", gated=None, endpoint=hub.endpoint)
    assert hub.requests() == [("GET", "/api/models/rxt-org/new"), ("GET", "/api/models/rxt-org/open")]
    assert hub.repos["rxt-org/open"]["gated"] is False and "rxt-org/new" not in hub.repos


def test_ungated_or_unlicensed_requests_are_refused_before_any_request(hub, moe_model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="gated=False would publish an RxT model without the RAML v1.0 access form"):
        push_rxt_to_hub(moe_model, "rxt-org/x", gated=False, private=True, endpoint=hub.endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    with pytest.raises(ValueError, match="gated=False would publish"):
        moe_model.push_to_hub("rxt-org/x", gated=False)
    with pytest.raises(TypeError, match="expects an RxT model .* got RxTMemoryAttention"):  # a component alone
        moe_model.memory_attention.push_to_hub("rxt-org/x")
    # a card without the licence fields, or one whose access form contradicts the gating mode
    no_licence = build_model_card(moe_model).content.replace("license_name: raml-v1.0", "license_name: mit")
    with pytest.raises(RxTCardValidationError, match="license_name"):
        push_rxt_to_hub(moe_model, "rxt-org/x", card=ModelCard(no_licence), endpoint=hub.endpoint)
    manual_card = build_model_card(moe_model, gated="manual")
    with pytest.raises(RxTCardValidationError, match="extra_gated_description must be .* gated='auto'"):
        push_rxt_to_hub(moe_model, "rxt-org/x", card=manual_card, gated="auto", endpoint=hub.endpoint)
    assert hub.calls == []


def test_rxt_push_keep_on_a_new_public_repo_is_refused(hub, moe_model, tmp_path, capsys):
    from transformers_rxt.cli import main

    moe_model.save_pretrained(tmp_path / "model")
    rc = main(["push", str(tmp_path / "model"), "--repo-id", "rxt-org/x", "--gated", "keep", "--public",
               "--endpoint", hub.endpoint])
    assert rc == 2
    assert "rxt push: error: gated=None (--gated keep) keeps the gating of an existing repository, but rxt-org/x " \
           "does not exist yet" in capsys.readouterr().err
    assert hub.requests() == [("GET", "/api/models/rxt-org/x")]  # nothing created, nothing uploaded
    with pytest.raises(SystemExit):  # argparse: an ungated push cannot even be asked for
        main(["push", str(tmp_path / "model"), "--repo-id", "rxt-org/x", "--gated", "false"])


def test_remote_code_copy_refuses_to_push(hub, moe_model, tmp_path):
    """Without the package, the copied modeling code refuses instead of pushing transformers' generic card."""
    model_dir = tmp_path / "saved"
    moe_model.save_pretrained(model_dir)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["transformers_rxt"] = None  # any import of the package fails
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        try:
            model.push_to_hub("rxt-org/remote", private=False)
        except ImportError as error:
            print("REFUSED", error)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_mock_write_token",
               HF_HOME=str(tmp_path / "hf"), PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED push_to_hub of an RxT model needs the transformers-rxt package" in result.stdout
    assert "pip install transformers-rxt" in result.stdout
    assert hub.calls == []


def test_bad_push_input_fails_before_any_request(hub, moe_model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs a repo_id"):
        push_rxt_to_hub(moe_model, "", endpoint=hub.endpoint)
    with pytest.raises(ValueError, match="needs a repo_id"):
        push_rxt_to_hub(moe_model, None, endpoint=hub.endpoint)
    with pytest.raises(ValueError, match="invalid repo_id"):
        push_rxt_to_hub(moe_model, "a/b/c", endpoint=hub.endpoint)
    with pytest.raises(ValueError, match="repo_id 'x' has no namespace: pass 'your-name/x'"):
        push_rxt_to_hub(moe_model, "x", endpoint=hub.endpoint)
    with pytest.raises(ValueError, match="gated='yes'"):
        push_rxt_to_hub(moe_model, "rxt-org/x", gated="yes", endpoint=hub.endpoint)
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_rxt_to_hub(str(tmp_path), "rxt-org/x", endpoint=hub.endpoint)
    with pytest.raises(TypeError, match="expects an RxT model"):
        push_rxt_to_hub(torch.nn.Linear(2, 2), "rxt-org/x", endpoint=hub.endpoint)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        push_rxt_to_hub(moe_model, "rxt-org/x", colour="red", endpoint=hub.endpoint)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="no Hugging Face token"):
        push_rxt_to_hub(moe_model, "rxt-org/x", endpoint=hub.endpoint)
    assert hub.calls == []


def test_trainer_mixin_writes_the_raml_card(moe_model, tokenizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    from transformers_rxt.hub.trainer import RxTHubTrainerMixin

    class StageTrainer(RxTHubTrainerMixin, Trainer):
        rxt_stage = "supervised-memory-aware"

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    trainer = StageTrainer(model=moe_model, args=args, processing_class=tokenizer)
    trainer.state.global_step, trainer.state.epoch = 12, 2.0
    trainer.state.log_history = [{"loss": 1.75, "step": 12}]
    trainer.create_model_card(dataset="ReactiveAI/TinyStories-MRL", tags="smat-run")
    card = validate_model_card(tmp_path / "out" / "README.md")
    assert card.data.datasets == ["ReactiveAI/TinyStories-MRL"] and "smat-run" in card.data.tags
    assert "| 1 | supervised-memory-aware | ReactiveAI/TinyStories-MRL | 12 | 2.0 | - | 1.75 |" in card.text
    assert (tmp_path / "out" / "LICENSE").is_file()
    with pytest.raises(ValueError, match="RAML"):
        trainer.create_model_card(license="apache-2.0")


def test_rxt_push_command(hub, moe_model, tokenizer, tmp_path, capsys):
    import argparse

    from transformers_rxt.hub.push import add_push_parser

    model_dir, tok_dir = tmp_path / "model", tmp_path / "tok"
    moe_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(tok_dir)
    (tmp_path / "stages.json").write_text(json.dumps(STAGES))
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    parser = argparse.ArgumentParser(prog="rxt")
    add_push_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["push", str(model_dir), "--repo-id", "rxt-org/cli", "--tokenizer", str(tok_dir),
                              "--stages", str(tmp_path / "stages.json"), "--eval-results", str(tmp_path / "eval.json"),
                              "--dataset", "roneneldan/TinyStories", "--endpoint", hub.endpoint])
    assert args.func(args) == 0
    assert "pushed" in capsys.readouterr().out
    files = hub.files["rxt-org/cli"]
    assert "tokenizer.json" in files and hub.created["visibility"] == "private"
    hub.assert_gated_before_upload("rxt-org/cli", "auto")
    card = validate_model_card(files["README.md"].decode())
    assert card.data.datasets == ["roneneldan/TinyStories"] and "TensorBLEU reward: 0.3125" in card.text
    assert json.loads(files["rxt_training_stages.json"]) == STAGES


def test_trainer_mixin_with_a_stage_model_and_logged_tokens(moe_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    from transformers_rxt.hub import RxTHubTrainerMixin
    from transformers_rxt.training import RxTForJointLMTraining

    class StageTrainer(RxTHubTrainerMixin, Trainer):
        rxt_stage = "joint-sft"

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    trainer = StageTrainer(model=RxTForJointLMTraining.from_rxt(moe_model), args=args)
    trainer.state.global_step = 5
    trainer.state.log_history = [{"loss": 2.0, "step": 5}, {"train_runtime": 1.0, "train_tokens": 4096}]
    trainer.create_model_card()
    card = validate_model_card(tmp_path / "out" / "README.md")
    assert "| 1 | joint-sft | - | 5 | - | 4,096 | 2.0 |" in card.text
    # the card describes the RxT model, without the stage's MLM head
    assert f"| **Total** | {count_parameters(moe_model)['total']['total']:,} (" in card.text


def _joint_trainer(tokenizer, tmp_path, **args):
    from transformers_rxt.data import pretraining_texts, tokenize_pretraining_dataset
    from transformers_rxt.training import JointLMConfig, JointLMTrainer

    texts = __import__("datasets").Dataset.from_dict({"text": pretraining_texts(8, seed=1)})
    data = tokenize_pretraining_dataset(texts, tokenizer, 48, truncation=True)
    config = JointLMConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, use_cpu=True,
                           report_to="none", disable_tqdm=True, seed=0, **args)
    return JointLMTrainer(tiny_model(vocab=VOCAB), config, train_dataset=data, processing_class=tokenizer)


def test_stage_trainer_push_to_hub_goes_through_the_gated_push(hub, tokenizer, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    trainer = _joint_trainer(tokenizer, tmp_path, push_to_hub=True, hub_model_id="rxt-org/joint", max_steps=1,
                             save_strategy="steps", save_steps=1, hub_strategy="every_save")
    # the repository is created and gated when the trainer opens it, before training
    assert hub.requests() == [("POST", "/api/repos/create"), ("PUT", "/api/models/rxt-org/joint/settings")]
    trainer.train()  # the save at step 1 pushes the checkpoint's model files
    (tmp_path / "out" / "my_private_notes.py").write_text('HF_TOKEN = "hf_secret_do_not_upload"\n')
    with caplog.at_level("WARNING"):
        trainer.push_to_hub(dataset="roneneldan/TinyStories", tags="joint-run")

    assert [c["header"]["summary"] for c in hub.commits] == ["Training in progress, step 1", "End of training"]
    for commit in hub.commits:
        assert set(commit["files"]) == ALLOWED_NAMES, commit["header"]["summary"]
    assert "my_private_notes.py" in caplog.text and "training_args.bin" in caplog.text
    hub.assert_gated_before_upload("rxt-org/joint", "auto")
    card = validate_model_card(hub.files["rxt-org/joint"]["README.md"].decode(), gated="auto")
    assert card.data.datasets == ["roneneldan/TinyStories"] and "joint-run" in card.data.tags
    assert "| 1 | joint-lm | roneneldan/TinyStories | 1 |" in card.text
    assert json.loads(hub.files["rxt-org/joint"]["rxt_training_stages.json"])[0]["stage"] == "joint-lm"


def test_stage_trainer_refuses_ungated_or_optimizer_state_pushes(hub, tokenizer, tmp_path, monkeypatch):
    from transformers_rxt.training import JointLMTrainer

    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    with pytest.raises(ValueError, match="hub_strategy='checkpoint' uploads the optimizer, scheduler and RNG"):
        _joint_trainer(tokenizer, tmp_path, push_to_hub=True, hub_model_id="rxt-org/j", hub_strategy="checkpoint")
    monkeypatch.setattr(JointLMTrainer, "rxt_gated", False)
    with pytest.raises(ValueError, match="gated=False would publish an RxT model without the RAML v1.0 access form"):
        _joint_trainer(tokenizer, tmp_path, push_to_hub=True, hub_model_id="rxt-org/j")
    trainer = _joint_trainer(tokenizer, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="gated=False would publish"):
        trainer.push_to_hub()
    assert hub.calls == []
