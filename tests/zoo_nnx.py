"""NNX models of the model zoo (the style of flax examples/gemma and the NNX
guides), built from plain widths so that ``rebuild=`` can construct them at
the reduced widths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo_linen import apply_rope


# ---------------------------------------------------------------- ResNet
class ResBlock(nnx.Module):
    def __init__(self, cin, cout, stride, rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.proj = (nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
                     if (cin, stride) != (cout, 1) else None)
        self.bn_proj = nnx.BatchNorm(cout, rngs=rngs) if self.proj is not None else None

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        r = x if self.proj is None else self.bn_proj(self.proj(x))
        return nnx.relu(r + y)


class ResNet(nnx.Module):
    def __init__(self, widths=(8, 16), classes=5, *, rngs):
        self.stem = nnx.Conv(3, widths[0], (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(widths[0], rngs=rngs)
        self.blocks = nnx.List([ResBlock(a, b, 1 if i == 0 else 2, rngs) for i, (a, b) in
                                enumerate(zip((widths[0],) + tuple(widths[:-1]), widths))])
        self.head = nnx.Linear(widths[-1], classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(axis=(1, 2)))


# ---------------------------------------------------------------- decoder-only LM
class LMBlock(nnx.Module):
    def __init__(self, d, heads, qkv, mlp, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, qkv_features=qkv,
                                           decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, mlp, rngs=rngs)
        self.down = nnx.Linear(mlp, d, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(nnx.relu(self.up(self.ln2(x))))


class LM(nnx.Module):
    def __init__(self, vocab=23, d=16, heads=4, qkv=16, mlp=32, layers=2, max_len=12, *, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, max_len, d)) * 0.02)
        self.blocks = nnx.List([LMBlock(d, heads, qkv, mlp, rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        mask = nnx.make_causal_mask(ids)
        for b in self.blocks:
            x = b(x, mask)
        return self.embed.attend(self.norm(x))


# ---------------------------------------------------------------- encoder-decoder
class CrossBlock(nnx.Module):
    def __init__(self, d, heads, mlp, rngs):
        self.ln1, self.ln2, self.ln3 = (nnx.LayerNorm(d, rngs=rngs) for _ in range(3))
        self.self_attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.cross = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.up, self.down = nnx.Linear(d, mlp, rngs=rngs), nnx.Linear(mlp, d, rngs=rngs)

    def __call__(self, y, enc, mask):
        y = y + self.self_attn(self.ln1(y), mask=mask)
        y = y + self.cross(self.ln2(y), enc)
        return y + self.down(nnx.relu(self.up(self.ln3(y))))


class EncDec(nnx.Module):
    def __init__(self, vocab=23, d=16, heads=4, mlp=32, *, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.enc = LMBlock(d, heads, d, mlp, rngs)
        self.enc_norm = nnx.LayerNorm(d, rngs=rngs)
        self.dec = CrossBlock(d, heads, mlp, rngs)
        self.dec_norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, src, tgt):
        enc = self.enc_norm(self.enc(self.embed(src), None))
        y = self.dec(self.embed(tgt), enc, nnx.make_causal_mask(tgt))
        return self.embed.attend(self.dec_norm(y))


# ---------------------------------------------------------------- ViT
class ViTBlock(nnx.Module):
    def __init__(self, d, heads, mlp, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(d, mlp, rngs=rngs), nnx.Linear(mlp, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class ViT(nnx.Module):
    def __init__(self, d=16, heads=4, mlp=24, layers=2, tokens=16, gap=True, classes=5, *, rngs):
        self.gap = gap
        self.patch = nnx.Conv(3, d, (4, 4), strides=(4, 4), padding="VALID", rngs=rngs)
        self.cls = None if gap else nnx.Param(jnp.zeros((1, 1, d)))
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, tokens + (not gap), d)) * 0.02)
        self.blocks = nnx.List([ViTBlock(d, heads, mlp, rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, img):
        x = self.patch(img)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        if not self.gap:
            x = jnp.concatenate([jnp.tile(self.cls[...], (n, 1, 1)), x], axis=1)
        x = x + self.pos[...]
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)
        return self.head(x.mean(axis=1) if self.gap else x[:, 0])


# ---------------------------------------------------------------- MLP-Mixer
class Mixer(nnx.Module):
    def __init__(self, d=16, tokens=16, tok_mlp=12, ch_mlp=24, classes=5, *, rngs):
        self.stem = nnx.Conv(3, d, (4, 4), strides=(4, 4), rngs=rngs)
        self.ln1, self.ln2, self.ln3 = (nnx.LayerNorm(d, rngs=rngs) for _ in range(3))
        self.t1, self.t2 = nnx.Linear(tokens, tok_mlp, rngs=rngs), nnx.Linear(tok_mlp, tokens, rngs=rngs)
        self.c1, self.c2 = nnx.Linear(d, ch_mlp, rngs=rngs), nnx.Linear(ch_mlp, d, rngs=rngs)
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, img):
        x = self.stem(img)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        y = jnp.swapaxes(self.ln1(x), 1, 2)
        x = x + jnp.swapaxes(self.t2(nnx.gelu(self.t1(y))), 1, 2)
        x = x + self.c2(nnx.gelu(self.c1(self.ln2(x))))
        return self.head(self.ln3(x).mean(axis=1))


# ---------------------------------------------------------------- ConvNeXt
class ConvNeXt(nnx.Module):
    def __init__(self, d=16, hidden=64, classes=5, *, rngs):
        self.stem = nnx.Conv(3, d, (2, 2), strides=(2, 2), rngs=rngs)
        self.dw = nnx.Conv(d, d, (7, 7), feature_group_count=d, rngs=rngs)
        self.ln = nnx.LayerNorm(d, epsilon=1e-6, rngs=rngs)
        self.pw1, self.pw2 = nnx.Linear(d, hidden, rngs=rngs), nnx.Linear(hidden, d, rngs=rngs)
        self.gamma = nnx.Param(jnp.full((d,), 0.5))
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, img):
        x = self.stem(img)
        x = x + self.gamma[...] * self.pw2(nnx.gelu(self.pw1(self.ln(self.dw(x)))))
        return self.head(x.mean(axis=(1, 2)))


# ---------------------------------------------------------------- MobileNetV2 block + SE
class MBConv(nnx.Module):
    def __init__(self, c=8, expand=32, se=4, classes=5, *, rngs):
        self.stem = nnx.Conv(3, c, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs)
        self.bn0 = nnx.BatchNorm(c, rngs=rngs)
        self.exp = nnx.Conv(c, expand, (1, 1), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(expand, rngs=rngs)
        self.dw = nnx.Conv(expand, expand, (3, 3), feature_group_count=expand, use_bias=False,
                           rngs=rngs)
        self.bn2 = nnx.BatchNorm(expand, rngs=rngs)
        self.se1, self.se2 = nnx.Conv(expand, se, (1, 1), rngs=rngs), nnx.Conv(se, expand, (1, 1), rngs=rngs)
        self.proj = nnx.Conv(expand, c, (1, 1), use_bias=False, rngs=rngs)
        self.bn3 = nnx.BatchNorm(c, rngs=rngs)
        self.head = nnx.Linear(c, classes, rngs=rngs)

    def __call__(self, img):
        x = nnx.relu6(self.bn0(self.stem(img)))
        y = nnx.relu6(self.bn1(self.exp(x)))
        y = nnx.swish(self.bn2(self.dw(y)))
        s = nnx.swish(self.se1(y.mean(axis=(1, 2), keepdims=True)))
        y = y * nnx.sigmoid(self.se2(s))
        x = x + self.bn3(self.proj(y))
        return self.head(x.mean(axis=(1, 2)))


# ---------------------------------------------------------------- U-Net
class UNet(nnx.Module):
    def __init__(self, f=8, groups=2, out=3, *, rngs):
        conv = lambda a, b: nnx.Conv(a, b, (3, 3), rngs=rngs)
        self.d1, self.n1 = conv(3, f), nnx.GroupNorm(f, num_groups=groups, rngs=rngs)
        self.d2, self.n2 = conv(f, 2 * f), nnx.GroupNorm(2 * f, num_groups=groups, rngs=rngs)
        self.up = nnx.ConvTranspose(2 * f, f, (2, 2), strides=(2, 2), rngs=rngs)
        self.u1, self.n3 = conv(2 * f, f), nnx.GroupNorm(f, num_groups=groups, rngs=rngs)
        self.out = nnx.Conv(f, out, (1, 1), rngs=rngs)

    def __call__(self, x):
        s = nnx.silu(self.n1(self.d1(x)))
        y = nnx.max_pool(s, (2, 2), (2, 2))
        y = nnx.silu(self.n2(self.d2(y)))
        y = jnp.concatenate([self.up(y), s], axis=-1)
        return self.out(nnx.silu(self.n3(self.u1(y))))


# ---------------------------------------------------------------- Llama / Gemma decoder
class GQAttention(nnx.Module):
    def __init__(self, d, heads, kv, hd, rngs):
        self.heads, self.kv, self.hd = heads, kv, hd
        self.q = nnx.Einsum("BTD,DNH->BTNH", (d, heads, hd), rngs=rngs)
        self.kv_proj = nnx.Einsum("BTD,CDKH->CBTKH", (2, d, kv, hd), rngs=rngs)
        self.o = nnx.Einsum("BTNH,NHD->BTD", (heads, hd, d), rngs=rngs)
        self.scale = hd ** -0.5  # computed from the config, as Gemma does

    def __call__(self, x, positions):
        b, t, _ = x.shape
        q = apply_rope(self.q(x), positions)
        k, v = self.kv_proj(x)
        k = apply_rope(k, positions)
        q = q.reshape(b, t, self.kv, self.heads // self.kv, self.hd) * self.scale
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k)
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -2.3819763e38)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, self.heads, self.hd)
        return self.o(out)


class Gemma(nnx.Module):
    def __init__(self, vocab=23, d=16, heads=4, kv=2, hd=6, hidden=24, layers=2, *, rngs):
        self.d = d
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.attn = nnx.List([GQAttention(d, heads, kv, hd, rngs) for _ in range(layers)])
        self.n1 = nnx.List([nnx.RMSNorm(d, rngs=rngs) for _ in range(layers)])
        self.n2 = nnx.List([nnx.RMSNorm(d, rngs=rngs) for _ in range(layers)])
        self.gate = nnx.List([nnx.Linear(d, hidden, use_bias=False, rngs=rngs) for _ in range(layers)])
        self.up = nnx.List([nnx.Linear(d, hidden, use_bias=False, rngs=rngs) for _ in range(layers)])
        self.down = nnx.List([nnx.Linear(hidden, d, use_bias=False, rngs=rngs) for _ in range(layers)])
        self.final = nnx.RMSNorm(d, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids) * jnp.sqrt(self.d).astype(jnp.float32)
        positions = jnp.arange(ids.shape[1])[None]
        for attn, n1, n2, g, u, dn in zip(self.attn, self.n1, self.n2, self.gate, self.up, self.down):
            x = x + attn(n1(x), positions)
            h = n2(x)
            x = x + dn(nnx.silu(g(h)) * u(h))
        return self.embed.attend(self.final(x))

    @staticmethod
    def rebuild(v):
        """The model at the widths of the pruned variables ``v``."""
        a = v["attn"][0]
        _, d, kv, hd = a["kv_proj"]["kernel"].shape
        heads = a["q"]["kernel"].shape[1]
        return Gemma(v["embed"]["embedding"].shape[0], d, heads, kv, hd,
                     v["gate"][0]["kernel"].shape[1], len(v["attn"]), rngs=nnx.Rngs(0))
