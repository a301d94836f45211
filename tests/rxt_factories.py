"""Tiny RxT configs and models shared by the tests."""

import torch

from transformers_rxt import RxTConfig, RxTForConversationalGeneration, train_rxt_tokenizer


def tiny_config(decoder=None, encoder=None, memory=None, vocab=96, dim=32, heads=4, layers=2, slots=8,
                seq_len=48, **kwargs) -> RxTConfig:
    common = dict(num_layers=layers, vocab_size=vocab, embed_dim=dim, att_heads=heads, seq_len=seq_len,
                  stm_size=slots, att_groups=2, att_query_groups=2)
    dec = dict(common, ff_dim=48, cross_att_groups=2, cross_att_query_groups=2)
    dec.update(decoder or {})
    enc = dict(common, ff_dim=64, skip_memory_cross_attention=True)
    enc.update(encoder or {})
    mem = dict(num_layers=layers, embed_dim=dim, att_heads=heads, seq_len=seq_len, stm_size=slots, att_groups=2,
               att_query_groups=2, interlayer_att_groups=2, interlayer_att_query_groups=2, self_att_groups=2,
               self_att_query_groups=2)
    mem.update(memory or {})
    return RxTConfig(decoder_config=dec, encoder_config=enc, memory_attention_config=mem, **kwargs)


def tiny_model(seed=0, **kwargs) -> RxTForConversationalGeneration:
    torch.manual_seed(seed)
    model = RxTForConversationalGeneration(tiny_config(**kwargs)).eval()
    # Make the output head prefer [EOS] a little so that some generations stop early.
    with torch.no_grad():
        model.lm_head.bias[model.config.eos_token_id] += 1.0
    return model


def interaction_batch(batch=2, length=12, vocab=96, seed=0, pad_rows=True):
    """Right-padded `[BOS][Q]...[A]...[EOS]`-shaped ids with a mask; row i>0 is shorter when pad_rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(11, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    ids[:, 0], ids[:, 1] = 2, 5
    for row in range(batch):
        n = length - (2 * row if pad_rows else 0)
        ids[row, n // 2] = 6
        ids[row, n - 1] = 3
        ids[row, n:] = 0
        mask[row, n:] = 0
    return ids, mask


def story_tokenizer(vocab_size: int):
    """A small RxT tokenizer trained on short story sentences (fox, cat, river, stone, ...)."""
    texts = [f"the {a} {b} ran to the {c} and found a {d}" for a in ("small", "red", "old") for b in ("fox", "cat")
             for c in ("river", "hill", "house") for d in ("stone", "friend", "story")]
    return train_rxt_tokenizer(texts * 3, vocab_size=vocab_size)
