"""TensorBLEU in three settings: a batched reward tensor, a TRL reward function, and an `evaluate` metric.

    python examples/tensorbleu_reward.py

Runs offline on CPU in a few seconds (uses a CUDA device when there is one).
"""

import torch

from transformers_rxt.metrics import (
    TENSORBLEU_PATH,
    TensorBLEUReward,
    tensor_corpus_bleu,
    tensor_sentence_bleu,
    tensorbleu_reward,
)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # 1) Tensors in, tensor out: score a batch of sampled answers against reference answers, on the device.
    #    Right padding with pad id 0; the second sample has two references (an all-pad row = no reference).
    completions = torch.tensor([[11, 12, 13, 14, 15, 0], [21, 22, 23, 0, 0, 0]], device=device)
    references = torch.tensor(
        [[[11, 12, 13, 14, 16, 0], [0, 0, 0, 0, 0, 0]], [[21, 22, 24, 0, 0, 0], [21, 22, 23, 25, 0, 0]]],
        device=device,
    )
    print("sentence BLEU-4 (method1):", tensor_sentence_bleu(completions, references).tolist())
    print("corpus BLEU-4:", tensor_corpus_bleu(completions, references).item())
    # The RxT MRL reward's choice in the reference code: BLEU-2 with NLTK smoothing method4, scaled to 0-10.
    print(
        "BLEU-2 reward x10:",
        tensorbleu_reward(completions, references, max_n=2, smoothing="method4", scale=10).tolist(),
    )

    # 2) A TRL reward function: GRPOTrainer(..., reward_funcs=[reward]) calls it with the completion ids and
    #    the dataset columns; here the "answer" column holds text, encoded with a (toy word) tokenizer.
    vocab: dict[str, int] = {}

    def tokenize(text: str) -> list[int]:
        return [vocab.setdefault(word, len(vocab) + 1) for word in text.split()]

    reward = TensorBLEUReward(reference_column="answer", tokenizer=tokenize, max_n=2, device=device)
    rewards = reward(
        prompts=["Where is the cat?", "What barks?"],
        completions=["the cat is on the mat", "a dog"],
        completion_ids=[tokenize("the cat is on the mat"), tokenize("a dog")],
        answer=["the cat sits on the mat", ["a dog barks", "the dog"]],
    )
    print(f"TRL reward {reward.__name__!r}:", rewards)

    # 3) The `evaluate` metric (optional extra), loaded by path: no network, no registration needed.
    try:
        import evaluate
    except ImportError:
        print("evaluate is not installed: pip install 'transformers-rxt[evaluate]'")
        return
    bleu = evaluate.load(TENSORBLEU_PATH)
    print("evaluate:", bleu.compute(predictions=[[11, 12, 13, 14, 15]], references=[[[11, 12, 13, 14, 16]]]))


if __name__ == "__main__":
    main()
