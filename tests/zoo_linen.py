"""Linen models of the model zoo, written in the style of the Flax examples
(imagenet ResNet, lm1b/wmt Transformer, gemma) and google-research/vision_transformer
(ViT, R+ViT hybrid, MLP-Mixer), with tiny configurations."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------------- ResNet (flax examples/imagenet)
class ResNetBlock(nn.Module):
    filters: int
    conv: Any
    norm: Any
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int] = (1, 1)
    num_filters: int = 8
    num_classes: int = 5
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(nn.Conv, use_bias=False)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       axis_name=self.axis_name if train else None)
        x = conv(self.num_filters, (3, 3), name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2 ** i, conv, norm, strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


# ---------------------------------------------------------------- Transformer (flax examples/lm1b, wmt)
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 23
    emb_dim: int = 16
    num_heads: int = 4
    num_layers: int = 2
    qkv_dim: int = 16
    mlp_dim: int = 32
    max_len: int = 12
    dropout_rate: float = 0.1
    deterministic: bool = True
    learned_pos: bool = True


def sinusoidal_init(max_len: int):
    def init(key, shape, dtype=np.float32):
        d_feature = shape[-1]
        pe = np.zeros((max_len, d_feature), dtype=np.float32)
        position = np.arange(0, max_len)[:, np.newaxis]
        div_term = np.exp(np.arange(0, d_feature, 2) * -(np.log(10000.0) / d_feature))
        pe[:, : d_feature // 2] = np.sin(position * div_term)
        pe[:, d_feature // 2: 2 * (d_feature // 2)] = np.cos(position * div_term)
        return jnp.array(pe[np.newaxis])
    return init


class AddPositionEmbs(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs):
        cfg = self.config
        length = inputs.shape[1]
        shape = (1, cfg.max_len, inputs.shape[-1])
        if cfg.learned_pos:
            pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), shape)
        else:
            pe = sinusoidal_init(cfg.max_len)(None, shape)
        return inputs + pe[:, :length, :]


class MlpBlock(nn.Module):
    config: TransformerConfig
    out_dim: Optional[int] = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        out_dim = x.shape[-1] if self.out_dim is None else self.out_dim
        x = nn.relu(nn.Dense(cfg.mlp_dim)(x))
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=cfg.deterministic)
        x = nn.Dense(out_dim)(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=cfg.deterministic)


class DecoderBlock(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, mask=None, encoded=None, cross_mask=None):
        cfg = self.config
        attn = partial(nn.MultiHeadDotProductAttention, num_heads=cfg.num_heads,
                       qkv_features=cfg.qkv_dim, dropout_rate=cfg.dropout_rate,
                       deterministic=cfg.deterministic)
        y = nn.LayerNorm()(x)
        y = attn()(y, mask=mask)
        x = x + nn.Dropout(cfg.dropout_rate)(y, deterministic=cfg.deterministic)
        if encoded is not None:
            y = nn.LayerNorm()(x)
            y = attn()(y, encoded, mask=cross_mask)
            x = x + nn.Dropout(cfg.dropout_rate)(y, deterministic=cfg.deterministic)
        return x + MlpBlock(cfg)(nn.LayerNorm()(x))


class Encoder(nn.Module):
    config: TransformerConfig
    shared_embedding: Any

    @nn.compact
    def __call__(self, ids):
        cfg = self.config
        x = AddPositionEmbs(cfg)(self.shared_embedding(ids))
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=cfg.deterministic)
        mask = nn.make_attention_mask(ids > 0, ids > 0)
        for _ in range(cfg.num_layers):
            x = DecoderBlock(cfg)(x, mask=mask)
        return nn.LayerNorm(name="encoder_norm")(x)


class Decoder(nn.Module):
    config: TransformerConfig
    shared_embedding: Any

    @nn.compact
    def __call__(self, ids, encoded=None, enc_ids=None):
        cfg = self.config
        y = jnp.pad(ids, ((0, 0), (1, 0)))[:, :-1]  # shift_right
        y = AddPositionEmbs(cfg)(self.shared_embedding(y))
        y = nn.Dropout(cfg.dropout_rate)(y, deterministic=cfg.deterministic)
        mask = nn.make_causal_mask(ids)
        cross = None if enc_ids is None else nn.make_attention_mask(ids > 0, enc_ids > 0)
        for _ in range(cfg.num_layers):
            y = DecoderBlock(cfg)(y, mask=mask, encoded=encoded, cross_mask=cross)
        y = nn.LayerNorm(name="decoder_norm")(y)
        logits = self.shared_embedding.attend(y.astype(jnp.float32))
        return logits / jnp.sqrt(y.shape[-1])  # as lm1b does with tied embeddings


class TransformerLM(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.config.vocab_size, self.config.emb_dim,
                         embedding_init=nn.initializers.normal(stddev=1.0))
        return Decoder(self.config, embed)(ids)


class EncoderDecoder(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, src, tgt):
        embed = nn.Embed(self.config.vocab_size, self.config.emb_dim,
                         embedding_init=nn.initializers.normal(stddev=1.0))
        encoded = Encoder(self.config, embed)(src)
        return Decoder(self.config, embed)(tgt, encoded, src)


# ---------------------------------------------------------------- ViT / R+ViT (vision_transformer)
class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=0.1,
                                            deterministic=self.deterministic)(y, y)
        x = x + nn.Dropout(0.1)(y, deterministic=self.deterministic)
        y = nn.LayerNorm()(x)
        y = nn.gelu(nn.Dense(self.mlp_dim)(y))
        y = nn.Dropout(0.1)(y, deterministic=self.deterministic)
        y = nn.Dense(x.shape[-1])(y)
        return x + nn.Dropout(0.1)(y, deterministic=self.deterministic)


class StdConv(nn.Conv):
    """Weight-standardised convolution (BiT / R+ViT)."""

    def param(self, name, *a, **k):
        p = super().param(name, *a, **k)
        if name == "kernel":
            p = (p - jnp.mean(p, axis=(0, 1, 2))) / jnp.sqrt(jnp.var(p, axis=(0, 1, 2)) + 1e-5)
        return p


class ViT(nn.Module):
    hidden: int = 16
    mlp_dim: int = 24
    heads: int = 4
    layers: int = 2
    classifier: str = "token"
    num_classes: int = 5
    resnet: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        if self.resnet:  # R+ViT hybrid: a GroupNorm/StdConv stem
            x = StdConv(12, (3, 3), use_bias=False, name="conv_root")(x)
            x = nn.relu(nn.GroupNorm(num_groups=4, name="gn_root")(x))
            y = StdConv(12, (3, 3), use_bias=False)(x)
            x = nn.relu(x + nn.GroupNorm(num_groups=4)(y))
        x = nn.Conv(self.hidden, (4, 4), strides=(4, 4), padding="VALID", name="embedding")(x)
        n, h, w, c = x.shape
        x = jnp.reshape(x, [n, h * w, c])
        if self.classifier == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
            x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, x.shape[1], c))
        x = nn.Dropout(0.1)(x + pos, deterministic=self.deterministic)
        for _ in range(self.layers):
            x = Encoder1DBlock(self.mlp_dim, self.heads, self.deterministic)(x)
        x = nn.LayerNorm(name="encoder_norm")(x)
        x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
        return nn.Dense(self.num_classes, name="head")(x)


# ---------------------------------------------------------------- MLP-Mixer (vision_transformer)
class MixerMlp(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.mlp_dim)(x))
        return nn.Dense(x.shape[-1])(y)


class Mixer(nn.Module):
    hidden: int = 16
    tokens_mlp: int = 12
    channels_mlp: int = 24
    blocks: int = 2
    num_classes: int = 5

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.hidden, (4, 4), strides=(4, 4), name="stem")(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        for _ in range(self.blocks):
            y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)
            x = x + jnp.swapaxes(MixerMlp(self.tokens_mlp)(y), 1, 2)
            x = x + MixerMlp(self.channels_mlp)(nn.LayerNorm()(x))
        x = nn.LayerNorm(name="pre_head_layer_norm")(x)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))


# ---------------------------------------------------------------- ConvNeXt block
class ConvNeXtBlock(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.dim, (7, 7), feature_group_count=self.dim)(x)  # depthwise 7x7
        y = nn.LayerNorm(epsilon=1e-6)(y)  # over channels
        y = nn.gelu(nn.Dense(4 * self.dim)(y))  # inverted MLP
        y = nn.Dense(self.dim)(y)
        gamma = self.param("layer_scale", nn.initializers.constant(0.5), (self.dim,))
        return x + gamma * y


class ConvNeXt(nn.Module):
    dim: int = 16
    blocks: int = 2
    num_classes: int = 5

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(nn.Conv(self.dim, (2, 2), strides=(2, 2), name="stem")(x))
        for _ in range(self.blocks):
            x = ConvNeXtBlock(self.dim)(x)
        return nn.Dense(self.num_classes)(nn.LayerNorm()(jnp.mean(x, axis=(1, 2))))


# ---------------------------------------------------------------- MobileNetV2 / EfficientNet block
class SqueezeExcite(nn.Module):
    reduced: int

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.swish(nn.Conv(self.reduced, (1, 1))(s))
        return x * nn.sigmoid(nn.Conv(x.shape[-1], (1, 1))(s))


class MBConv(nn.Module):
    out: int
    expand: int = 4
    train: bool = False

    @nn.compact
    def __call__(self, x):
        bn = partial(nn.BatchNorm, use_running_average=not self.train, momentum=0.9)
        c = x.shape[-1]
        y = nn.relu6(bn()(nn.Conv(c * self.expand, (1, 1), use_bias=False)(x)))
        y = nn.Conv(c * self.expand, (3, 3), feature_group_count=c * self.expand, use_bias=False)(y)
        y = nn.swish(bn()(y))
        y = SqueezeExcite(max(1, c // 2))(y)
        y = bn()(nn.Conv(self.out, (1, 1), use_bias=False)(y))
        return x + y if self.out == c else y


class MobileNet(nn.Module):
    train: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu6(nn.BatchNorm(use_running_average=not self.train)(
            nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False)(x)))
        x = MBConv(8, train=self.train)(x)
        x = MBConv(12, train=self.train)(x)
        return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


# ---------------------------------------------------------------- U-Net with concatenated skips
class ConvBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3))(x)
            x = nn.silu(nn.GroupNorm(num_groups=2)(x))
        return x


class UNet(nn.Module):
    features: Sequence[int] = (8,)
    out: int = 3

    @nn.compact
    def __call__(self, x):
        skips = []
        for f in self.features:
            x = ConvBlock(f)(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = ConvBlock(2 * self.features[-1])(x)
        for f, skip in zip(reversed(self.features), reversed(skips)):
            x = nn.ConvTranspose(f, (2, 2), strides=(2, 2))(x)
            x = ConvBlock(f)(jnp.concatenate([x, skip], axis=-1))
        return nn.Conv(self.out, (1, 1))(x)


# ---------------------------------------------------------------- Llama / Gemma decoder
def apply_rope(x, positions, max_wavelength=10_000):
    """Rotary embeddings, rotate-half layout (as flax examples/gemma)."""
    head_dim = x.shape[-1]
    fraction = 2 * jnp.arange(0, head_dim // 2) / head_dim
    timescale = max_wavelength ** fraction
    sinusoid = positions[..., None] / timescale[None, None, :]
    sin, cos = jnp.sin(sinusoid)[:, :, None, :], jnp.cos(sinusoid)[:, :, None, :]
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + 1e-6) * (1 + scale)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 23
    dim: int = 16
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 6
    hidden: int = 24
    layers: int = 2


class LlamaAttention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, positions):
        c = self.cfg
        q = nn.DenseGeneral((c.heads, c.head_dim), use_bias=False, name="q")(x)
        k = nn.DenseGeneral((c.kv_heads, c.head_dim), use_bias=False, name="k")(x)
        v = nn.DenseGeneral((c.kv_heads, c.head_dim), use_bias=False, name="v")(x)
        q, k = apply_rope(q, positions), apply_rope(k, positions)
        b, t = x.shape[:2]
        q = q.reshape(b, t, c.kv_heads, c.heads // c.kv_heads, c.head_dim) * c.head_dim ** -0.5
        logits = jnp.einsum("btkgh,bskh->bkgts", q, k)
        mask = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(mask, logits, -2.3819763e38)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, c.heads, c.head_dim)
        return nn.DenseGeneral(c.dim, axis=(-2, -1), use_bias=False, name="o")(out)


class Llama(nn.Module):
    cfg: LlamaConfig = LlamaConfig()

    @nn.compact
    def __call__(self, ids):
        c = self.cfg
        embed = nn.Embed(c.vocab, c.dim, embedding_init=nn.initializers.normal(1.0))
        x = embed(ids) * jnp.sqrt(c.dim).astype(jnp.float32)  # Gemma scales the embeddings
        positions = jnp.arange(ids.shape[1])[None]
        for _ in range(c.layers):
            x = x + LlamaAttention(c)(RMSNorm()(x), positions)
            h = RMSNorm()(x)
            gate = nn.Dense(c.hidden, use_bias=False)(h)
            up = nn.Dense(c.hidden, use_bias=False)(h)
            x = x + nn.Dense(c.dim, use_bias=False)(nn.silu(gate) * up)  # SwiGLU
        return embed.attend(RMSNorm()(x))
