"""GPU check: the CUDA paths that CPU CI cannot run, against CPU fp32 results, with one summary table.

    bash scripts/gpu_check.sh            # on a CUDA machine (under 8 minutes on one GPU)
    bash scripts/gpu_check.sh --cpu      # every check on CPU at small sizes (no flash-attention): a dry run

Checks (each row of the table: PASS, FAIL or SKIP with the reason; the exit status is 1 when any row FAILs):

* ``rxt-<attn>-bf16``: an RxT-Alpha-Mini-shaped model (random weights, seed 0) in bf16 on the device with
  ``attn_implementation`` sdpa and flash_attention_2, teacher-forced logits of an unpadded and a padded batch vs
  the same model in fp32 on CPU (normwise relative error; bf16 weights and activations through 12 layers give
  0.04 on CPU).
* ``sqa-kernel-bf16``: a tiny SQA Llama (``attn_implementation="sqa"``: flash when installed and unmasked, SDPA
  otherwise) in bf16 on the device vs fp32 on CPU, unpadded and padded.
* ``async-vs-sync-update``: three turns of ``generate`` with the memory update on the CUDA side stream (async)
  and inline (sync): the memories must be equal.
* ``tensorbleu-vs-nltk``: ``tensor_sentence_bleu`` on the device vs NLTK ``sentence_bleu`` (method1), and its
  speed-up over the NLTK loop.
* ``sqa-long-<T>``: the SQA kernel alone at 32k, 64k and 128k tokens (bf16, causal, nominal 16 heads of 64):
  SQA (8 q / 4 kv heads) and xSQA (4 / 4) vs GQA with the same 4 K/V heads but all 16 query heads: output vs
  a repeat-K/V SDPA reference (32k), and the time ratio.

Never part of CI: CI has no GPU. ``--cpu`` runs the same code at small sizes and is exercised by
``tests/test_gpu_check.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from transformers_rxt import RxTForConversationalGeneration, STMCache
from transformers_rxt.benchmarks.bench_inference import mini_config  # RxT-Alpha-Mini's shape, as benchmarked
from transformers_rxt.metrics import tensor_sentence_bleu
from transformers_rxt.sqa import sqa_attention_forward, sqa_config


@dataclasses.dataclass
class Row:
    check: str
    status: str  # PASS / FAIL / SKIP
    measured: str
    limit: str
    seconds: float = 0.0


def relative_error(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Normwise relative error ||got - want|| / ||want|| over the real (unmasked) positions."""
    got, want = got.float().cpu(), want.float().cpu()
    if mask is not None:
        keep = mask.bool().cpu()
        got, want = got[keep], want[keep]
    return ((got - want).norm() / want.norm().clamp(min=1e-12)).item()


def interaction_ids(batch: int, length: int, vocab: int, padded: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(11, vocab, (batch, length), generator=g)
    ids[:, 0], ids[:, 1], ids[:, length // 2] = 2, 5, 6
    mask = torch.ones_like(ids)
    if padded:
        for row in range(1, batch):
            ids[row, length - 3 * row:], mask[row, length - 3 * row:] = 0, 0
    return ids, mask


def timed(fn, sync, repeats: int = 3) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------------- checks


def check_rxt_attention(device, dtype, limit, length) -> list[Row]:
    torch.manual_seed(0)
    ref_model = RxTForConversationalGeneration(mini_config(1024)).eval()
    stm = ref_model.init_memory(2, generator=torch.Generator().manual_seed(0))
    batches = {padded: interaction_ids(2, length, ref_model.config.vocab_size, padded) for padded in (False, True)}
    with torch.no_grad():
        want = {p: ref_model(ids, attention_mask=mask, stm=stm.memory).logits for p, (ids, mask) in batches.items()}
    model = copy.deepcopy(ref_model).to(device=device, dtype=dtype)
    memory = stm.memory.to(device=device, dtype=dtype)
    rows = []
    for impl in ("sdpa", "flash_attention_2"):
        name = f"rxt-{impl}-{str(dtype).split('.')[-1]}"
        if impl == "flash_attention_2" and device.type != "cuda":
            rows.append(Row(name, "SKIP", "flash-attention needs CUDA", "-"))
            continue
        start = time.perf_counter()
        try:
            model.set_attn_implementation(impl)
        except ImportError as err:
            rows.append(Row(name, "FAIL", f"not installed: {err}".splitlines()[0][:60], "-"))
            continue
        errors = []
        with torch.no_grad():
            for padded, (ids, mask) in batches.items():
                got = model(ids.to(device), attention_mask=mask.to(device), stm=memory).logits
                errors.append(relative_error(got, want[padded], mask))
        worst = max(errors)
        rows.append(Row(name, "PASS" if worst <= limit else "FAIL",
                        f"rel. err unpadded {errors[0]:.2e}, padded {errors[1]:.2e}", f"<= {limit:g}",
                        time.perf_counter() - start))
    return rows


def check_sqa_kernel(device, dtype, limit) -> list[Row]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    start = time.perf_counter()
    base = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(sqa_config(base, "sqa"), attn_implementation="sqa").eval()
    model = AutoModelForCausalLM.from_config(sqa_config(base, "sqa"), attn_implementation="sqa").eval()
    model.load_state_dict(ref.state_dict())
    model.to(device=device, dtype=dtype)
    errors = []
    for padded in (False, True):
        ids, mask = interaction_ids(2, 128, 512, padded)
        with torch.no_grad():
            want = ref(ids, attention_mask=mask).logits
            got = model(ids.to(device), attention_mask=mask.to(device)).logits
        errors.append(relative_error(got, want, mask))
    kernel = "flash (unpadded) + SDPA (padded)" if device.type == "cuda" else "SDPA"
    return [Row(f"sqa-kernel-{str(dtype).split('.')[-1]}", "PASS" if max(errors) <= limit else "FAIL",
                f"{kernel}: rel. err {errors[0]:.2e}, {errors[1]:.2e}", f"<= {limit:g}", time.perf_counter() - start)]


def check_async_update(device) -> list[Row]:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = RxTForConversationalGeneration(mini_config(1024)).eval().to(device)
    initial = torch.randn(1, 12, 256, 256, generator=torch.Generator().manual_seed(0)).to(device)
    stms = {mode: STMCache(initial.clone(), model.model_signature) for mode in ("async", "sync")}
    worst = 0.0
    for turn in range(3):
        ids, _ = interaction_ids(1, 16, model.config.vocab_size, False)
        ids = ids[:, : ids.shape[1] // 2 + 1].to(device)  # [BOS][Q]query[A]
        for mode, stm in stms.items():
            model.generate(ids, stm=stm, max_new_tokens=8, do_sample=False, memory_update=mode)
        stms["async"].wait()
        worst = max(worst, (stms["async"].memory - stms["sync"].memory).abs().max().item())
    where = "CUDA side stream" if device.type == "cuda" else "CPU thread"
    return [Row("async-vs-sync-update", "PASS" if worst == 0.0 else "FAIL",
                f"{where}: max |diff| {worst:.1e} over 3 turns", "== 0", time.perf_counter() - start)]


def check_tensorbleu(device, batch, length) -> list[Row]:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    cand = torch.randint(1, 32000, (batch, length), generator=g)
    ref = torch.where(torch.rand(batch, length, generator=g) < 0.6, cand, torch.randint(1, 32000, (batch, length),
                                                                                         generator=g))
    smooth = SmoothingFunction().method1

    def nltk_loop():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [sentence_bleu([r], c, smoothing_function=smooth) for c, r in zip(cand.tolist(), ref.tolist())]

    t0 = time.perf_counter()
    want = torch.tensor(nltk_loop(), dtype=torch.float64)
    t_nltk = time.perf_counter() - t0
    c, r = cand.to(device), ref.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_ours = timed(lambda: tensor_sentence_bleu(c, r, dtype=torch.float64), sync)
    got = tensor_sentence_bleu(c, r, dtype=torch.float64).cpu()
    diff = (got - want).abs().max().item()
    return [Row("tensorbleu-vs-nltk", "PASS" if diff <= 1e-6 else "FAIL",
                f"{batch}x{length}: max |diff| {diff:.1e}; {t_nltk / t_ours:.0f}x NLTK "
                f"({t_ours * 1e3:.1f} vs {t_nltk * 1e3:.0f} ms)", "<= 1e-06", time.perf_counter() - start)]


def check_sqa_long(device, dtype, lengths, reference_limit, gate_speed=True) -> list[Row]:
    """``gate_speed=False`` (the CPU dry run): the speed-ups are reported, not required; short CPU runs on a
    shared machine time the load as much as the kernel."""
    rows = []
    module = torch.nn.Module()
    module.is_causal = True
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    head_dim, heads = 64, 16
    for i, length in enumerate(lengths):
        start = time.perf_counter()
        g = torch.Generator(device=device).manual_seed(i)

        def qkv(hq, hkv):
            shape = (1, length, head_dim)
            q = torch.randn(shape[0], hq, *shape[1:], device=device, dtype=dtype, generator=g)
            k = torch.randn(shape[0], hkv, *shape[1:], device=device, dtype=dtype, generator=g)
            v = torch.randn(shape[0], hkv, *shape[1:], device=device, dtype=dtype, generator=g)
            return q, k, v

        times = {}
        for name, (hq, hkv) in {"gqa": (heads, 4), "sqa": (heads // 2, 4), "xsqa": (heads // 4, 4)}.items():
            q, k, v = qkv(hq, hkv)
            times[name] = timed(lambda: sqa_attention_forward(module, q, k, v, None), sync, repeats=2)
            if name == "sqa" and i == 0:  # the kernel's output vs SDPA on repeated K/V, first length only
                got, _ = sqa_attention_forward(module, q, k, v, None)
                ref = F.scaled_dot_product_attention(q, k.repeat_interleave(hq // hkv, 1),
                                                     v.repeat_interleave(hq // hkv, 1), is_causal=True)
                err = relative_error(got, ref.transpose(1, 2))
            del q, k, v
        speed_sqa, speed_xsqa = times["gqa"] / times["sqa"], times["gqa"] / times["xsqa"]
        fast = speed_sqa > 1.2 and speed_xsqa > speed_sqa * 1.2
        ok = (fast or not gate_speed) and (i > 0 or err <= reference_limit)
        measured = (f"GQA {times['gqa'] * 1e3:.1f} ms, SQA {speed_sqa:.2f}x, xSQA {speed_xsqa:.2f}x faster"
                    + (f"; rel. err {err:.1e}" if i == 0 else ""))
        limit = ("SQA > 1.2x, xSQA > 1.2x SQA" if gate_speed else "speed reported only") + (
            f", err <= {reference_limit:g}" if i == 0 else "")
        rows.append(Row(f"sqa-long-{length // 1024}k" if length >= 1024 else f"sqa-long-{length}",
                        "PASS" if ok else "FAIL", measured, limit, time.perf_counter() - start))
    return rows


# ------------------------------------------------------------------------------------------------------- driver


def run_checks(cpu: bool) -> list[Row]:
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); run on a GPU "
                         "machine, or pass --cpu for the CPU dry run.")
    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.bfloat16
    rows: list[Row] = []
    steps = {
        "rxt-attention": lambda: check_rxt_attention(device, dtype, limit=0.1, length=32 if cpu else 256),
        "sqa-kernel": lambda: check_sqa_kernel(device, dtype, limit=0.05),
        "async-vs-sync-update": lambda: check_async_update(device),
        "tensorbleu-vs-nltk": lambda: check_tensorbleu(device, *((32, 64) if cpu else (512, 1024))),
        "sqa-long": lambda: check_sqa_long(device, dtype, [1024, 2048] if cpu else [32768, 65536, 131072],
                                           reference_limit=0.02, gate_speed=not cpu),
    }
    for name, step in steps.items():
        try:
            rows.extend(step())
        except Exception as err:  # a crash is a failed check, reported in the table like the others
            rows.append(Row(name, "FAIL", f"{type(err).__name__}: {err}"[:160], "-"))
    return rows


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print("| check | status | measured | limit | s |")
    print("|---|---|---|---|---:|")
    for row in rows:
        print(f"| {row.check} | {row.status} | {row.measured} | {row.limit} | {row.seconds:.1f} |")


def exit_status(rows: list[Row]) -> int:
    return 1 if any(row.status == "FAIL" for row in rows) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="dry run: every check on CPU at small sizes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run_checks(args.cpu)
    device = "CPU (dry run)" if args.cpu else torch.cuda.get_device_name()
    print_table(rows, f"gpu_check on {device}, torch {torch.__version__}, "
                      f"{time.perf_counter() - start:.0f} s in all\n")
    status = exit_status(rows)
    print("\nFAILED" if status else "\nall checks passed (SKIP rows were not checked)")
    return status


if __name__ == "__main__":
    sys.exit(main())
