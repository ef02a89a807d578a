"""Parameter lists with the shapes of real architectures (no weights are downloaded)."""
from __future__ import annotations

import random


def gpt2_124m() -> list[tuple[int, ...]]:
    """GPT-2 small (124M): 148 tensors, as in the Hugging Face checkpoint."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn c_attn, c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp c_fc, c_proj
    return shapes + [(d,), (d,)]  # ln_f


def llama_1b() -> list[tuple[int, ...]]:
    """Llama-style 1.2B (Llama 3.2 1B layout, tied embeddings): 146 tensors."""
    d, vocab, layers, ffn, kv = 2048, 128256, 16, 8192, 512
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d), (kv, d), (kv, d), (d, d)]  # q, k, v, o
        shapes += [(ffn, d), (ffn, d), (d, ffn)]  # gate, up, down
        shapes += [(d,), (d,)]  # input and post-attention RMSNorm
    return shapes + [(d,)]


def resnet50() -> list[tuple[int, ...]]:
    """ResNet-50 (torchvision layout): 53 convolutions, 53 batch norms (weight, bias), fc: 161 tensors."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out_ch = 4 * width
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if b == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]  # downsample
            in_ch = out_ch
    return shapes + [(1000, 2048), (1000,)]


def bert_base() -> list[tuple[int, ...]]:
    """BERT-base (bert-base-uncased, BertModel with pooler): 199 tensors, 109M parameters."""
    d, vocab, ctx, layers, ffn = 768, 30522, 512, 12, 3072
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d), (2, d), (d,), (d,)]  # word, position, token type, LayerNorm
    for _ in range(layers):
        shapes += [(d, d), (d,)] * 4  # query, key, value, attention output
        shapes += [(d,), (d,)]  # attention LayerNorm
        shapes += [(ffn, d), (ffn,), (d, ffn), (d,)]  # intermediate, output
        shapes += [(d,), (d,)]  # output LayerNorm
    return shapes + [(d, d), (d,)]  # pooler


def mixtral_moe_small() -> list[tuple[int, ...]]:
    """Mixtral-style mixture of experts, scaled down: 995 tensors, 198M parameters.

    Mixtral 8x7B's layout (32 layers, 8 experts of three matrices each, a
    router, grouped-query attention with 4 query heads per KV head, untied
    embeddings, RMSNorms) with every width divided by 16 (hidden 256, expert
    FFN 896), so that the list keeps the model's 768 expert tensors but takes
    0.8 GB in fp32 instead of 187 GB.
    """
    d, vocab, layers, ffn, kv, experts = 256, 32000, 32, 896, 64, 8
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d), (kv, d), (kv, d), (d, d)]  # q, k, v, o
        shapes += [(experts, d)]  # router
        shapes += [(ffn, d), (d, ffn), (ffn, d)] * experts  # w1, w2, w3 of each expert
        shapes += [(d,), (d,)]  # input and post-attention RMSNorm
    return shapes + [(d,), (vocab, d)]  # final norm, lm_head


def small_tensors(count: int = 10_000, low: int = 64, high: int = 4096, seed: int = 0) -> list[tuple[int, ...]]:
    """`count` 1-D tensors of low..high elements (seeded): the host-bound case."""
    rng = random.Random(seed)
    return [(rng.randint(low, high),) for _ in range(count)]


def giant() -> list[tuple[int, ...]]:
    """One tensor: the 128256 x 2048 embedding of the Llama-style model (263M elements)."""
    return [(128256, 2048)]


def tiny() -> list[tuple[int, ...]]:
    """Five small odd-shaped tensors: runs in seconds; for tests, not in the default sets."""
    return [(3, 5), (7,), (2, 3, 4), (1,), (11, 13)]


SETS = {
    "gpt2-124m": gpt2_124m,
    "bert-base": bert_base,
    "llama-1.2b": llama_1b,
    "resnet50": resnet50,
    "mixtral-moe-small": mixtral_moe_small,
    "10k-small": small_tensors,
    "giant": giant,
    "tiny": tiny,
}
DEFAULT_SETS = [name for name in SETS if name != "tiny"]
# --quick: the two ends, bandwidth-bound ResNet-50 and host-bound 10,000
# small tensors (0.1 GB each), in about a minute.
QUICK_SETS = ["resnet50", "10k-small"]
