"""TensorBLEU through Hugging Face `evaluate`: load by path, by name after registration, offline.

`evaluate` reads its cache locations when it is imported, so the loading checks run in a subprocess whose
HF_HOME / HF_MODULES_CACHE point into tmp_path: nothing touches the user's caches.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from transformers_rxt.metrics import (
    TENSORBLEU_PATH,
    compute_tensorbleu,
    pad_id_lists,
    tensor_corpus_bleu,
    tensor_sentence_bleu,
)

PREDICTIONS = [[5, 6, 7, 8, 9], [1, 2, 3], [], [0, 4, 4, 4, 4]]
REFERENCES = [[[5, 6, 7, 9, 8, 9]], [[1, 2, 3, 4], [1, 2]], [[3, 3]], [[0, 4, 4, 5, 4]]]


def torch_scores(predictions, references, **options):
    cand, ref = pad_id_lists(predictions, references)
    corpus = tensor_corpus_bleu(cand, ref, pad_token_id=-1, dtype=torch.float64, **options).item()
    sentences = tensor_sentence_bleu(cand, ref, pad_token_id=-1, dtype=torch.float64, **options).tolist()
    return corpus, sentences


def test_compute_matches_torch_functions():
    result = compute_tensorbleu(PREDICTIONS, REFERENCES)
    corpus, sentences = torch_scores(PREDICTIONS, REFERENCES)
    assert result["bleu"] == corpus and result["sentence_bleu"] == sentences
    # Closest reference lengths: 6; 4 and 2 tie for length 3, the shorter wins; 2; 5.
    assert result["translation_length"] == 5 + 3 + 0 + 5 and result["reference_length"] == 6 + 2 + 2 + 5
    nltk = pytest.importorskip("nltk.translate.bleu_score")
    assert result["bleu"] == pytest.approx(
        nltk.corpus_bleu(REFERENCES, PREDICTIONS, smoothing_function=nltk.SmoothingFunction().method1),
        abs=1e-12,
    )
    # Token id 0 is a real token for list inputs (no padding involved).
    method1 = nltk.SmoothingFunction().method1
    assert result["sentence_bleu"][3] == pytest.approx(
        nltk.sentence_bleu(REFERENCES[3], PREDICTIONS[3], smoothing_function=method1), abs=1e-12
    )
    assert result["sentence_bleu"][3] != pytest.approx(
        nltk.sentence_bleu([[4, 4, 5, 4]], [4, 4, 4, 4], smoothing_function=method1), abs=1e-3
    )
    with pytest.raises(ValueError, match="4 predictions but 3 references"):
        compute_tensorbleu(PREDICTIONS, REFERENCES[:3])


_SCRIPT = textwrap.dedent("""
    import json, sys
    import evaluate
    from transformers_rxt.metrics import TENSORBLEU_PATH, TensorBLEUMetric, register_evaluate_metric

    preds, refs = json.loads(sys.argv[1])
    out = {}
    try:
        evaluate.load("tensorbleu")
        out["before_registration"] = "loaded"
    except FileNotFoundError as err:
        out["before_registration"] = "FileNotFoundError"

    by_path = evaluate.load(TENSORBLEU_PATH)
    out["path"] = by_path.compute(predictions=preds, references=refs)
    out["path_bleu2"] = by_path.compute(predictions=preds, references=refs, max_n=2, smoothing="method4")
    out["installed"] = str(register_evaluate_metric())
    by_name = evaluate.load("tensorbleu")
    out["name_class"] = type(by_name).__name__
    out["name"] = by_name.compute(predictions=preds, references=refs)
    out["single_refs"] = by_name.compute(predictions=[[1, 2, 3, 4]], references=[[1, 2, 3, 5]])
    for p, r in zip(preds, refs):
        by_name.add_batch(predictions=[p], references=[r])
    out["batched"] = by_name.compute()
    vocab = {}
    tokenize = lambda text: [vocab.setdefault(w, len(vocab)) for w in text.split()]
    out["text"] = by_name.compute(
        predictions=["the cat sat on the mat"], references=[["the cat is on the mat"]], tokenizer=tokenize
    )
    out["direct"] = TensorBLEUMetric(keep_in_memory=True).compute(predictions=preds, references=refs)
    print("RESULT" + json.dumps(out))
    """)


def test_evaluate_load_by_path_and_by_name_offline(tmp_path):
    pytest.importorskip("evaluate")
    env = dict(
        os.environ,
        HF_HOME=str(tmp_path / "hf"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_EVALUATE_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    # Run from an empty directory: a ./tensorbleu folder in the working directory would shadow the name.
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps([PREDICTIONS, REFERENCES])],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])

    assert out["before_registration"] == "FileNotFoundError"
    corpus, sentences = torch_scores(PREDICTIONS, REFERENCES)
    for key in ("path", "name", "batched", "direct"):
        assert out[key]["bleu"] == corpus and out[key]["sentence_bleu"] == sentences, key
    corpus2, sentences2 = torch_scores(PREDICTIONS, REFERENCES, max_n=2, smoothing="method4")
    assert out["path_bleu2"]["bleu"] == corpus2 and out["path_bleu2"]["sentence_bleu"] == sentences2
    assert out["name_class"] == "TensorBLEUMetric"
    installed = out["installed"]
    assert installed.startswith(str(tmp_path / "modules")) and "evaluate-metric--tensorbleu" in installed
    assert open(installed).read() == open(TENSORBLEU_PATH).read()
    single, _ = torch_scores([[1, 2, 3, 4]], [[[1, 2, 3, 5]]])
    assert out["single_refs"]["bleu"] == single
    text, _ = torch_scores([[0, 1, 2, 3, 0, 4]], [[[0, 1, 5, 3, 0, 4]]])
    assert out["text"]["bleu"] == text
