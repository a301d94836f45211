"""Where does an RxT model lose facts? Write, read, retention and scale, measured on held-out facts.

    python benchmarks/diagnose_memory.py outputs/main/stage2 outputs/main/stage3 outputs/main/stage4 [--probes 256]

For each model directory (any stage's output) it prints one table per measure:

- **read** (the decoder alone): the question answered with a "perfect" memory, i.e. the fact interaction's own
  encoder states in place of the STM (the stage 1-2 interface), vs with a fresh STM (nothing to read);
- **write** (encoder + memory attention): a fresh STM, the fact interaction written once, then the question,
  with no distractor in between;
- **retention**: the same after k distractor interactions (small talk / arithmetic / world knowledge, or other
  facts), plus the cosine similarity of the STM to its state right after the fact was written and the mean
  residual-gate value (share of a slot replaced by each write) per memory layer;
- **crowding** (the read among other memories): k interactions (other facts, or small talk) written *before*
  the fact, then the question right after it. Retention cannot lose the fact here; a fall with k means the
  decoder cannot find the newest fact among the others (or the write into a used memory is weaker);
- **scale**: RMS per slot of a fresh STM, of the encoder states, and of the STM after 1 and 8 writes;
- **focus** (models with ``fifo_write_slots``, whose write puts each interaction in known slots): on teacher-forced
  held-out dialogues, the decoder's memory cross-attention at the position that predicts the recalled value,
  per layer (mean over heads): the share on the fact's slot group, and how often that group gets the most, for
  values predicted right and wrong (facts that have already left the memory are not counted);
- **probe** (the write, read by linear classifiers instead of the decoder): a fact written into a fresh STM; a
  softmax regression per memory layer predicts the recalled value, the person the fact is about and its object
  from the fact's slot group (FIFO models) or from all slots of the layer, trained on train-split facts and
  scored on held-out ones;
- **gradients** (stage-4 training step on 6-turn episodes): gradient norms per component, and the norm of the
  gradient that reaches the STM j updates back, with the memory detached every ``--backprop-turns`` updates.

Accuracy is the exact-match key-word accuracy of the greedy answer (``fact_key_correct``), as in
``rxt eval-memory``. Everything is teacher forced except the answer to the question: distractor and fact
interactions are written with their reference answers.
"""

from __future__ import annotations

import argparse
import random
import re
from collections import defaultdict

import torch

from transformers_rxt import RxTForConversationalGeneration, load_rxt_tokenizer
from transformers_rxt.data.synthetic import (ITEMS, OBJECTS, PEOPLE, build_memory_dialogues, dialogue_turns,
                                             fact_key_correct)
from transformers_rxt.modeling_rxt import RxTResidualGate
from transformers_rxt.tokenization_rxt import tokenize_interactions, tokenize_prompts


def heldout_probes(count: int, seed: int) -> tuple[list[dict], dict[str, list[tuple[str, str]]]]:
    """Recall probes of held-out dialogues (fact interaction + question) and pools of distractor turns."""
    dialogues = build_memory_dialogues(max(count // 2, 8), 8, seed=seed, split="heldout").to_list()
    probes, facts, neutral = [], [], []
    for record in dialogues:
        turns = dialogue_turns(record)
        fact_turns = {p["fact_turn"] for p in record["probes"]}
        probe_turns = {p["turn"] for p in record["probes"]}
        for k, t in enumerate(turns):
            pair = (t["query"], t["answer"])
            if k in fact_turns:
                facts.append(pair)
            elif k not in probe_turns and not t["answer"].startswith(("Got it", "Noted", "Okay", "I see")):
                neutral.append(pair)
        for p in record["probes"]:
            fact = turns[p["fact_turn"]]
            probes.append({"fact": (fact["query"], fact["answer"]), "question": turns[p["turn"]]["query"],
                           "expected": p["expected"], "kind": p["kind"]})
    return probes[:count], {"neutral": neutral, "facts": facts}


class Diagnoser:
    def __init__(self, model: RxTForConversationalGeneration, tokenizer, batch_size: int = 64, seed: int = 0):
        self.model, self.tok, self.batch_size, self.seed = model.eval(), tokenizer, batch_size, seed

    def fresh(self, batch: int, offset: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + offset)
        return self.model.init_memory(batch, generator=gen).memory

    @torch.no_grad()
    def write(self, memory: torch.Tensor, pairs: list[tuple[str, str]]) -> torch.Tensor:
        enc = tokenize_interactions(self.tok, [q for q, _ in pairs], [a for _, a in pairs])
        return self.model.compute_memory_update(enc["input_ids"], enc["attention_mask"], memory)

    @torch.no_grad()
    def encoder_states(self, pair: tuple[str, str]) -> torch.Tensor:
        enc = tokenize_interactions(self.tok, [pair[0]], [pair[1]])
        return self.model.encode(enc["input_ids"], enc["attention_mask"])[0]  # [1, L, T, D]

    @torch.no_grad()
    def answer(self, questions: list[str], memory: torch.Tensor | None = None,
               encoder_memory: torch.Tensor | None = None, max_new_tokens: int = 16) -> list[str]:
        """Greedy answers (a plain loop: `generate` needs an STM, the perfect memory is not one)."""
        enc = tokenize_prompts(self.tok, questions)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        start, eos = ids.shape[1], self.model.config.eos_token_id
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        budget = min(max_new_tokens, self.model.config.max_interaction_length - start)
        for _ in range(budget):
            kwargs = {"encoder_memory": encoder_memory} if encoder_memory is not None else {"stm": memory}
            logits = self.model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -1]
            nxt = torch.where(done, torch.full_like(done, eos, dtype=torch.long), logits.argmax(-1))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
        return self.tok.batch_decode(ids[:, start:], skip_special_tokens=True)

    def accuracy(self, probes: list[dict], answers: list[str]) -> float:
        return sum(fact_key_correct(a, p["expected"], p["kind"]) for p, a in zip(probes, answers)) / len(probes)

    def chunks(self, probes: list[dict]):
        for i in range(0, len(probes), self.batch_size):
            yield i, probes[i : i + self.batch_size]

    # ------------------------------------------------------------------ measures
    def read(self, probes: list[dict]) -> dict[str, float]:
        perfect, fresh = [], []
        for p in probes:  # one at a time: encoder states have no key mask in the decoder's joint interface
            perfect += self.answer([p["question"]], encoder_memory=self.encoder_states(p["fact"]))
        for i, chunk in self.chunks(probes):
            fresh += self.answer([p["question"] for p in chunk], memory=self.fresh(len(chunk), i))
        return {"perfect memory (fact's encoder states)": self.accuracy(probes, perfect),
                "fresh STM (nothing written)": self.accuracy(probes, fresh)}

    def retention(self, probes: list[dict], pools: dict, ks=(0, 1, 2, 4, 8)) -> dict:
        """Accuracy, STM similarity to the post-fact state, and residual gates after k distractor writes."""
        rng = random.Random(self.seed)
        gates: dict[int, list[float]] = defaultdict(list)
        hooks = self._gate_hooks(gates)
        out: dict = {}
        try:
            for pool_name, pool in pools.items():
                for k in ks:
                    answers, sims = [], []
                    gates.clear()
                    for i, chunk in self.chunks(probes):
                        memory = self.write(self.fresh(len(chunk), i), [p["fact"] for p in chunk])
                        after_fact = memory
                        for _ in range(k):
                            memory = self.write(memory, [rng.choice(pool) for _ in chunk])
                        answers += self.answer([p["question"] for p in chunk], memory=memory)
                        sims.append(torch.cosine_similarity(memory.flatten(2), after_fact.flatten(2), dim=-1))
                    sim = torch.cat(sims).mean(0)  # per layer
                    out[(pool_name, k)] = {"accuracy": self.accuracy(probes, answers),
                                           "similarity": [round(float(s), 3) for s in sim],
                                           "gate": {i: sum(v) / len(v) for i, v in sorted(gates.items())}}
        finally:
            for h in hooks:
                h.remove()
        return out

    @torch.no_grad()
    def crowding(self, probes: list[dict], pools: dict, ks=(0, 1, 2, 4, 8)) -> dict:
        """Accuracy of the question asked right after the fact, with k interactions written before the fact."""
        rng = random.Random(self.seed + 1)
        out: dict = {}
        for pool_name, pool in pools.items():
            for k in ks:
                answers = []
                for i, chunk in self.chunks(probes):
                    memory = self.fresh(len(chunk), i)
                    for _ in range(k):
                        memory = self.write(memory, [rng.choice(pool) for _ in chunk])
                    memory = self.write(memory, [p["fact"] for p in chunk])
                    answers += self.answer([p["question"] for p in chunk], memory=memory)
                out[(pool_name, k)] = self.accuracy(probes, answers)
        return out

    @torch.no_grad()
    def kinds(self, probes: list[dict]) -> dict[str, tuple[int, float]]:
        """Per fact kind, (questions, accuracy) of the question asked right after its fact, written alone into a
        fresh memory: what the write and read keep of each kind of value when nothing competes with it."""
        answers = []
        for i, chunk in self.chunks(probes):
            memory = self.write(self.fresh(len(chunk), i), [p["fact"] for p in chunk])
            answers += self.answer([p["question"] for p in chunk], memory=memory)
        out = {}
        for kind in sorted({p["kind"] for p in probes}):
            rows = [(p, a) for p, a in zip(probes, answers) if p["kind"] == kind]
            out[kind] = (len(rows), self.accuracy([p for p, _ in rows], [a for _, a in rows]))
        return out

    def _gate_hooks(self, store: dict[int, list[float]]):
        """Record the mean share of each slot that a write replaces (the final residual gate of each layer)."""
        gate_layers = self.model.memory_attention.residual_gate_layers
        hooks = []
        for i, gate in enumerate(gate_layers):
            def hook(module: RxTResidualGate, inputs, output, i=i):
                old, new = inputs[:2]  # (old, new[, write_share]): the output includes the share
                delta = (new - old).flatten()
                if float(delta.norm()) > 0:  # output = old + G (new - old) for sigmoid gates
                    store[i].append(float(((output - old).flatten() @ delta) / (delta @ delta)))
            hooks.append(gate.register_forward_hook(hook))
        return hooks

    @torch.no_grad()
    def scale(self, probes: list[dict], pools: dict) -> dict[str, list[float]]:
        def slot_rms(x):  # [B, L, S, D] -> per layer
            return [round(float(v), 3) for v in x.pow(2).mean(-1).sqrt().mean((0, 2))]

        chunk = probes[: self.batch_size]
        fresh = self.fresh(len(chunk))
        enc = tokenize_interactions(self.tok, [p["fact"][0] for p in chunk], [p["fact"][1] for p in chunk])
        states = self.model.encode(enc["input_ids"], enc["attention_mask"])[0]
        real = enc["attention_mask"].bool()
        enc_rms = [round(float(states[:, i][real].pow(2).mean(-1).sqrt().mean()), 3) for i in range(states.shape[1])]
        one = self.write(fresh, [p["fact"] for p in chunk])
        eight = one
        rng = random.Random(self.seed)
        for _ in range(7):
            eight = self.write(eight, [rng.choice(pools["neutral"]) for _ in chunk])
        return {"fresh STM": slot_rms(fresh), "encoder states (per token)": enc_rms,
                "STM after 1 write": slot_rms(one), "STM after 8 writes": slot_rms(eight)}


class CrossAttentionProbabilities:
    """Records the memory cross-attention probabilities [B, T, S] (mean over heads) of every decoder layer that
    reads the memory, recomputed from the query states and the cached memory keys the layer is called with."""

    def __init__(self, model: RxTForConversationalGeneration):
        self.layers = [layer.memory_cross_attention for layer in model.rxt.decoder.layers
                       if layer.memory_cross_attention is not None]
        if any(a.rope in ("qk", "q") for a in self.layers):  # the hook would need each query's position
            raise ValueError("focus needs unrotated memory queries: a model with rope_memory_cross_attention: false")
        self.recorded: list[torch.Tensor] = []
        self.handles = [a.register_forward_hook(self._record, with_kwargs=True) for a in self.layers]

    def _record(self, attention, args, kwargs, output) -> None:
        keys = kwargs["key_value"][0]  # [B, Hkv, S, hd]
        queries = attention._heads(attention.q_proj(args[0]), attention.num_query_heads)
        if queries.shape[1] > keys.shape[1]:  # query heads share key heads in contiguous groups
            keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
        elif queries.shape[1] < keys.shape[1]:  # reverse SQA: the query block is tiled over the key heads
            queries = queries.repeat(1, keys.shape[1] // queries.shape[1], 1, 1)
        scores = queries @ keys.transpose(-1, -2) / queries.shape[-1] ** 0.5
        self.recorded.append(torch.softmax(scores.float(), dim=-1).mean(dim=1))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def value_position(tokenizer, labels: torch.Tensor, expected: str) -> int | None:
    """The last position of shifted ``labels`` [T] whose token starts the recalled value ``expected``."""
    found = None
    for j in (labels != -100).nonzero().flatten().tolist():
        piece = tokenizer.decode([int(labels[j])]).strip().lower()
        if piece and expected.lower().startswith(piece):
            found = j
    return found


@torch.no_grad()
def read_focus(model: RxTForConversationalGeneration, tokenizer, dialogues: int, seed: int) -> dict:
    """Where the decoder's memory read looks when it predicts a recalled value (see the module docstring)."""
    width = model.config.memory_attention_config.get("fifo_write_slots")
    if not width:
        raise ValueError("focus needs a model with fifo_write_slots (the fact's slots are then known)")
    stm_size = model.config.memory_attention_config["stm_size"]
    groups_held = stm_size // width
    share, top = defaultdict(list), defaultdict(list)  # (layer, right) -> values
    by_distance = defaultdict(list)  # (layer, distance) -> share
    probs = CrossAttentionProbabilities(model)  # refuses rotated queries before any work
    try:
        records = build_memory_dialogues(dialogues, 8, seed=seed, split="heldout").to_list()
        for start in range(0, len(records), 64):
            batch = records[start:start + 64]
            turns = [dialogue_turns(r) for r in batch]
            memory = model.init_memory(len(batch)).memory
            for k in range(len(turns[0])):
                enc = tokenize_interactions(tokenizer, [t[k]["query"] for t in turns],
                                            [t[k]["answer"] for t in turns], return_labels=True)
                probs.recorded.clear()
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], stm=memory).logits
                predicted, labels = logits[:, :-1].argmax(-1), enc["labels"][:, 1:]
                for i, record in enumerate(batch):
                    # a fact more than stm_size / width writes back has left the FIFO memory: nothing to look at
                    for probe in (p for p in record["probes"] if p["turn"] == k and p["distance"] <= groups_held):
                        j = value_position(tokenizer, labels[i], probe["expected"])
                        if j is None:
                            continue
                        right = bool(predicted[i, j] == labels[i, j])
                        group = probe["distance"] - 1  # FIFO: the fact's slots moved back one group per write
                        for layer, p in enumerate(probs.recorded):
                            groups = p[i, j].unflatten(-1, (-1, width)).sum(-1)
                            share[(layer, right)].append(float(groups[group]))
                            top[(layer, right)].append(float(int(groups.argmax()) == group))
                            by_distance[(layer, probe["distance"])].append(float(groups[group]))
                memory = model.compute_memory_update(enc["input_ids"], enc["attention_mask"], memory)
    finally:
        probs.remove()
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"uniform": width / stm_size, "layers": [
        {"right": (len(share[(layer, True)]), mean(share[(layer, True)]), mean(top[(layer, True)])),
         "wrong": (len(share[(layer, False)]), mean(share[(layer, False)]), mean(top[(layer, False)])),
         "by_distance": {d: mean(v) for (l, d), v in sorted(by_distance.items()) if l == layer}}
        for layer in range(len(probs.layers))]}


def fact_values(split: str, dialogues: int, seed: int) -> list[tuple[str, str, str, str, str]]:
    """(fact query, fact answer, recalled value, person, object or "-") of every recall probe of ``dialogues``
    synthetic dialogues; person and object are the closed world's words in the question."""
    out = []
    for record in build_memory_dialogues(dialogues, 8, seed=seed, split=split).to_list():
        turns = dialogue_turns(record)
        for probe in record["probes"]:
            fact, words = turns[probe["fact_turn"]], set(re.findall(r"[A-Za-z]+", turns[probe["turn"]]["query"]))
            person = next(p for p in PEOPLE if p in words)
            obj = next((o for o in (*OBJECTS, *ITEMS) if o in words), "-")
            out.append((fact["query"], fact["answer"], probe["expected"], person, obj))
    return out


@torch.no_grad()
def written_slots(model: RxTForConversationalGeneration, tokenizer, facts: list[tuple]) -> torch.Tensor:
    """Each fact written into a fresh STM: its slot group (FIFO) or all slots, flattened per layer [N, L, F]."""
    width = model.config.memory_attention_config.get("fifo_write_slots") or model.config.memory_attention_config[
        "stm_size"]
    features = []
    for start in range(0, len(facts), 128):
        batch = facts[start:start + 128]
        enc = tokenize_interactions(tokenizer, [f[0] for f in batch], [f[1] for f in batch])
        memory = model.compute_memory_update(enc["input_ids"], enc["attention_mask"], model.init_memory(len(batch)).memory)
        features.append(memory[:, :, :width].flatten(2))
    return torch.cat(features)


PROBE_TARGETS = {"value": 2, "person": 3, "object": 4}  # column of fact_values


def value_probe(model: RxTForConversationalGeneration, tokenizer, heldout_dialogues: int, seed: int,
                train_dialogues: int = 1500, steps: int = 300) -> dict:
    """Held-out accuracy of linear probes for what a written fact holds (its value, whose it is, about what),
    per memory layer (see the module docstring)."""
    train, heldout = fact_values("train", train_dialogues, 11), fact_values("heldout", heldout_dialogues, seed)
    x_train, x_heldout = written_slots(model, tokenizer, train), written_slots(model, tokenizer, heldout)
    out = {"facts": (len(train), len(heldout)), "targets": {}}
    for target, column in PROBE_TARGETS.items():
        classes = sorted({f[column] for f in train + heldout})
        index = {c: i for i, c in enumerate(classes)}
        y_train = torch.tensor([index[f[column]] for f in train])
        y_heldout = torch.tensor([index[f[column]] for f in heldout])
        seen = {f[column] for f in train}  # a class no train fact has cannot be predicted: the probe's ceiling
        layers = [linear_probe(x_train[:, layer], y_train, x_heldout[:, layer], y_heldout, len(classes), steps)
                  for layer in range(x_train.shape[1])]
        out["targets"][target] = {"classes": len(classes), "layers": layers,
                                  "ceiling": sum(f[column] in seen for f in heldout) / len(heldout)}
    return out


def linear_probe(fit: torch.Tensor, y_fit: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor, classes: int,
                 steps: int) -> dict:
    """Train and held-out accuracy of a softmax regression on standardised features (fixed seed)."""
    mean, std = fit.mean(0), fit.std(0) + 1e-6
    fit, test = (fit - mean) / std, (test - mean) / std
    generator = torch.Generator().manual_seed(0)
    probe = torch.nn.Linear(fit.shape[1], classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(fit), y_fit).backward()
        optimizer.step()
    with torch.no_grad():
        return {"train": float((probe(fit).argmax(-1) == y_fit).float().mean()),
                "heldout": float((probe(test).argmax(-1) == y_test).float().mean())}


def gradient_flow(model_dir: str, tokenizer, backprop_turns: int, seed: int = 0, batch: int = 32) -> dict:
    """One stage-4 loss on 6-turn episodes: gradient norm per component and dL/dSTM_j for each update j."""
    from transformers_rxt.data import tokenize_mrl_dataset
    from transformers_rxt.data.collators import DataCollatorForRxTEpisodes
    from transformers_rxt.training import memory_aware
    from transformers_rxt.training.memory_aware import MemoryAwareConfig, RxTForMemoryAwareTraining
    from transformers_rxt.training.utils import component_of

    torch.manual_seed(seed)
    model = RxTForConversationalGeneration.from_pretrained(model_dir).train()
    args = MemoryAwareConfig(output_dir="/tmp/rxt-diagnose", backprop_turns=backprop_turns, report_to="none",
                             use_cpu=True)
    module = RxTForMemoryAwareTraining.from_rxt(model, args)
    records = build_memory_dialogues(batch, 5, seed=seed + 11, split="train", num_turns=6)
    data = tokenize_mrl_dataset(records, tokenizer, 64, truncation=True)
    collate = DataCollatorForRxTEpisodes.from_tokenizer(tokenizer)
    inputs = collate([data[i] for i in range(len(data))])
    stms: list[torch.Tensor] = []
    original = memory_aware.compute_memory_update

    def update(model, ids, mask, memory, rows=None):  # keep every written STM to read its gradient
        new = original(model, ids, mask, memory, rows)
        new.retain_grad()
        stms.append(new)
        return new

    memory_aware.compute_memory_update = update  # the episode engine's update, as stage 4 calls it
    try:
        loss = module(**{k: v for k, v in inputs.items()
                         if k in ("input_ids", "attention_mask", "labels", "turn_mask")},
                      generator=torch.Generator().manual_seed(seed))["loss"]
    finally:
        memory_aware.compute_memory_update = original
    loss.backward()
    norms: dict[str, float] = defaultdict(float)
    for name, p in module.named_parameters():
        if p.grad is not None:
            part = "memory cross-attention" if "memory_cross_attention" in name or "stm_norm" in name \
                else component_of(name)
            norms[part] += float(p.grad.pow(2).sum())
    return {"loss": loss.item(), "component_grad_norm": {k: v ** 0.5 for k, v in sorted(norms.items())},
            "stm_grad_norm": [float(s.grad.norm()) if s.grad is not None else 0.0 for s in stms]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model directories (stage outputs)")
    parser.add_argument("--probes", type=int, default=256, help="held-out recall probes (default: 256)")
    parser.add_argument("--seed", type=int, default=5, help="held-out dialogue seed (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--backprop-turns", type=int, nargs="+", default=[2, 0],
                        help="backprop_turns settings for the gradient-flow measure (default: 2 0)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["read", "retention", "crowding", "kinds", "scale", "focus", "probe",
                                                            "gradients"],
                        help="measures to skip")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probes, pools = heldout_probes(args.probes, args.seed)
    print(f"{len(probes)} held-out probes (seed {args.seed}); distractor pools: "
          f"{len(pools['neutral'])} neutral, {len(pools['facts'])} facts")
    for model_dir in args.models:
        tokenizer = load_rxt_tokenizer(model_dir)
        model = RxTForConversationalGeneration.from_pretrained(model_dir)
        diag = Diagnoser(model, tokenizer)
        print(f"\n## {model_dir}")
        if "read" not in args.skip:
            print("\n| read: question answered from | accuracy |\n|---|---:|")
            for name, acc in diag.read(probes).items():
                print(f"| {name} | {acc:.3f} |")
        if "retention" not in args.skip:
            print("\n| distractors | k | accuracy | STM cosine to post-fact state, per layer | gate per layer |")
            print("|---|---:|---:|---|---|")
            for (pool, k), r in diag.retention(probes, pools).items():
                gate = ", ".join(f"{g:.2f}" for g in r["gate"].values())
                print(f"| {pool} | {k} | {r['accuracy']:.3f} | {r['similarity']} | {gate} |")
        if "crowding" not in args.skip:
            print("\n| written before the fact | k | accuracy, question right after the fact |\n|---|---:|---:|")
            for (pool, k), acc in diag.crowding(probes, pools).items():
                print(f"| {pool} | {k} | {acc:.3f} |")
        if "kinds" not in args.skip:
            kinds = diag.kinds(probes)
            print("\n| fact alone in a fresh memory, question right after it | " + " | ".join(
                f"{kind} ({n})" for kind, (n, _) in kinds.items()) + " |")
            print("|---|" + "---:|" * len(kinds))
            print("| accuracy | " + " | ".join(f"{acc:.3f}" for _, acc in kinds.values()) + " |")
        if "scale" not in args.skip:
            print("\n| RMS per slot/token, per layer | values |\n|---|---|")
            for name, values in diag.scale(probes, pools).items():
                print(f"| {name} | {values} |")
        if "focus" not in args.skip and model.config.memory_attention_config.get("fifo_write_slots"):
            focus = read_focus(model, tokenizer, max(args.probes // 2, 8), args.seed)
            print(f"\n| focus: decoder layer | value predicted | n | share on the fact's slots (uniform "
                  f"{focus['uniform']:.3f}) | fact's slots get the most |\n|---:|---|---:|---:|---:|")
            for layer, f in enumerate(focus["layers"]):
                for name in ("right", "wrong"):
                    n, mass, first = f[name]
                    print(f"| {layer} | {name} | {n} | {mass:.3f} | {first:.2f} |")
            print("\n| focus by distance, decoder layer | " + " | ".join(
                str(d) for d in focus["layers"][0]["by_distance"]) + " |")
            print("|---:|" + "---:|" * len(focus["layers"][0]["by_distance"]))
            for layer, f in enumerate(focus["layers"]):
                print(f"| {layer} | " + " | ".join(f"{v:.2f}" for v in f["by_distance"].values()) + " |")
        if "probe" not in args.skip:
            probe = value_probe(model, tokenizer, max(args.probes // 2, 8), args.seed)
            where = "the fact's slots" if model.config.memory_attention_config.get("fifo_write_slots") else "all slots"
            targets = probe["targets"]
            print(f"\n| probe ({where}; {probe['facts'][0]} train / {probe['facts'][1]} held-out facts), held-out "
                  "accuracy | " + " | ".join(f"{t} ({r['classes']} classes, ceiling {r['ceiling']:.2f})"
                                             for t, r in targets.items()) + " |")
            print("|---:|" + "---:|" * len(targets))
            for layer in range(len(targets["value"]["layers"])):
                print(f"| memory layer {layer} | " + " | ".join(
                    f"{r['layers'][layer]['heldout']:.3f}" for r in targets.values()) + " |")
        if "gradients" not in args.skip:
            print("\n| backprop_turns | loss | grad norm per component | dL/dSTM after update 1..5 |")
            print("|---:|---:|---|---|")
            for bp in args.backprop_turns:
                g = gradient_flow(model_dir, tokenizer, bp)
                comps = ", ".join(f"{k} {v:.3f}" for k, v in g["component_grad_norm"].items())
                stm = ", ".join(f"{v:.2e}" for v in g["stm_grad_norm"])
                print(f"| {bp} | {g['loss']:.3f} | {comps} | {stm} |")


if __name__ == "__main__":
    main()
