"""Hand-written models, one per coupling pattern the engine must get right.

Each entry of ``MODELS`` builds ``(model, example_input)``; the model is in eval mode with
non-trivial batch-norm statistics, so a missed coupling cannot hide behind identity BNs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = cbr(cin, cout, 3, stride)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return F.relu(self.bn2(self.conv2(self.conv1(x))) + identity)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = cbr(cin, mid, 1)
        self.conv2 = cbr(mid, mid, 3, stride, groups=groups)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.bn3(self.conv3(self.conv2(self.conv1(x))))
        out += identity  # in-place residual, as torchvision writes it
        return torch.relu_(out)


class Classifier(nn.Module):
    """stem -> body -> global pool -> linear."""

    def __init__(self, body: nn.Module, stem_out: int, body_out: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, stem_out, 3, 2)
        self.body = body
        self.fc = nn.Linear(body_out, classes)

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_basic():
    body = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 32))
    return Classifier(body, 16, 32), torch.randn(2, 3, 32, 32)


def resnet_bottleneck():
    body = nn.Sequential(Bottleneck(16, 8, 32), Bottleneck(32, 8, 32), Bottleneck(32, 16, 64, 2))
    return Classifier(body, 16, 64), torch.randn(2, 3, 32, 32)


def resnext():
    body = nn.Sequential(Bottleneck(16, 16, 32, groups=4), Bottleneck(32, 16, 32, groups=4))
    return Classifier(body, 16, 32), torch.randn(2, 3, 32, 32)


class VGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(cbr(3, 16), nn.MaxPool2d(2), cbr(16, 32), nn.MaxPool2d(2),
                                      cbr(32, 32))
        self.classifier = nn.Sequential(nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def vgg():
    return VGG(), torch.randn(2, 3, 16, 16)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(cbr(cin, hidden, 1), cbr(hidden, hidden, 3, stride, hidden),
                                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


def mobilenet_v2():
    body = nn.Sequential(InvertedResidual(16, 16, 1, 2), InvertedResidual(16, 24, 2, 3),
                         InvertedResidual(24, 24, 1, 3))
    return Classifier(body, 16, 24), torch.randn(2, 3, 32, 32)


class DenseBlock(nn.Module):
    def __init__(self, cin: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(cbr(cin + i * growth, growth) for i in range(layers))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


def densenet():
    body = nn.Sequential(DenseBlock(16, 8, 3), cbr(40, 24, 1), nn.AvgPool2d(2), DenseBlock(24, 8, 2))
    return Classifier(body, 16, 40), torch.randn(2, 3, 32, 32)


class C2f(nn.Module):
    """YOLOv8's C2f: split the 1x1 conv output in two with chunk, grow, concat."""

    def __init__(self, cin: int, cout: int, n: int = 2) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = cbr(cin, 2 * self.c, 1)
        self.cv2 = cbr((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(nn.Sequential(cbr(self.c, self.c), cbr(self.c, self.c))
                               for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """One MaxPool module called three times."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cv1 = cbr(cin, cin // 2, 1)
        self.cv2 = cbr(cin // 2 * 4, cout, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class TinyDetector(nn.Module):
    """Backbone with C2f and SPPF, and a conv head whose channels are the output contract."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3, 2)
        self.c2f = C2f(16, 32)
        self.sppf = SPPF(32, 32)
        self.head = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.head(self.sppf(self.c2f(self.stem(x))))


def c2f_sppf():
    return TinyDetector(), torch.randn(1, 3, 32, 32)


class SEBlock(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.conv = cbr(c, c)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        y = self.conv(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return x + y * s


def squeeze_excite():
    body = nn.Sequential(SEBlock(16), cbr(16, 32, 3, 2), SEBlock(32))
    return Classifier(body, 16, 32), torch.randn(2, 3, 32, 32)


class FPN(nn.Module):
    """Three backbone levels, lateral 1x1 convs, top-down upsample + add, 3x3 outputs."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.c3, self.c4, self.c5 = cbr(3, 16, 3, 2), cbr(16, 32, 3, 2), cbr(32, 48, 3, 2)
        self.lat = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (16, 32, 48))
        self.out = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(3))
        self.head = nn.Conv2d(width, 6, 1)  # shared across levels, as in RetinaNet

    def forward(self, x):
        c3 = self.c3(x)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p5 = self.lat[2](c5)
        p4 = self.lat[1](c4) + F.interpolate(p5, scale_factor=2, mode="nearest")
        p3 = self.lat[0](c3) + F.interpolate(p4, size=c3.shape[-2:], mode="bilinear")
        return [self.head(F.relu(o(p))) for o, p in zip(self.out, (p3, p4, p5))]


def fpn():
    return FPN(), torch.randn(1, 3, 64, 64)


class SharedConv(nn.Module):
    """One conv module applied to two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(3, 16, 5)
        self.shared = cbr(16, 24)
        self.post = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.post(self.shared(self.a(x)) + self.shared(self.b(x)))


def shared_conv():
    return SharedConv(), torch.randn(1, 3, 16, 16)


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(cbr(3, 16, 3, 2), cbr(16, 32, 3, 2))
        self.up1 = nn.ConvTranspose2d(32, 24, 2, 2)
        self.bn = nn.BatchNorm2d(24)
        self.up2 = nn.ConvTranspose2d(24, 12, 4, 2, 1)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.up2(F.relu(self.bn(self.up1(self.enc(x)))))))


def conv_transpose():
    return Decoder(), torch.randn(1, 3, 32, 32)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: chunk, transform one half, concat, shuffle."""

    def __init__(self, c: int) -> None:
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(cbr(half, half, 1), cbr(half, half, 3, groups=half),
                                    cbr(half, half, 1))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((a, self.branch(b)), 1), 2)


def shufflenet():
    body = nn.Sequential(ShuffleUnit(16), ShuffleUnit(16), cbr(16, 32, 1), ShuffleUnit(32))
    return Classifier(body, 16, 32), torch.randn(2, 3, 32, 32)


class DepthwiseMultiplier(nn.Module):
    """Depthwise conv with channel multiplier 2, then grouped pointwise."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.dw = cbr(16, 32, 3, groups=16)
        self.gpw = cbr(32, 32, 1, groups=4)
        self.out = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.out(self.gpw(self.dw(self.stem(x))))


def depthwise_multiplier():
    return DepthwiseMultiplier(), torch.randn(1, 3, 16, 16)


class Conv1d3d(nn.Module):
    """conv1d over a sequence and conv3d over a volume, joined by a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.BatchNorm1d(16), nn.PReLU(16),
                                 nn.Conv1d(16, 8, 3, padding=1, groups=2), nn.ReLU())
        self.vol = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                                 nn.Conv3d(8, 8, 3, padding=1, groups=8), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, seq, vol):
        a = self.seq(seq).mean(dim=2)
        b = self.vol(vol).amax(dim=(2, 3, 4))
        return self.head(torch.cat([a, b], dim=1))


def conv1d_conv3d():
    return Conv1d3d(), (torch.randn(2, 4, 12), torch.randn(2, 1, 6, 6, 6))


class NormsBlock(nn.Module):
    """GroupNorm (grouped and per-channel) and a channels-first LayerNorm, as in ConvNeXt."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.inorm = nn.GroupNorm(16, 16)
        self.c3 = nn.Conv2d(16, 24, 1)
        self.ln = nn.LayerNorm(24)
        self.c4 = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        x = F.gelu(self.gn(self.c1(x)))
        x = F.silu(self.inorm(self.c2(x)))
        x = self.c3(x).permute(0, 2, 3, 1)
        x = self.ln(x).permute(0, 3, 1, 2)
        return self.c4(x)


def norms():
    return NormsBlock(), torch.randn(1, 3, 8, 8)


class TokenMixer(nn.Module):
    """Linear layers on tokens with a residual MLP and a matmul attention over 4 heads."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # B, N, C
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def token_mixer():
    return TokenMixer(), torch.randn(2, 3, 16, 16)


class SpatialGating(nn.Module):
    """MLP-Mixer and gMLP: a linear across tokens, applied to every channel (x[B, C, N] @
    W[N, N]: its FLOPs follow the channel count), and gMLP's gate, which halves the hidden
    channels with chunk and multiplies the halves."""

    def __init__(self, dim: int = 24, tokens: int = 16, hidden: int = 48) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.token_mix = nn.Linear(tokens, tokens)
        self.fc1 = nn.Linear(dim, hidden)
        self.gate_mix = nn.Linear(tokens, tokens)
        self.fc2 = nn.Linear(hidden // 2, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # B, N, C
        x = x + self.token_mix(x.transpose(1, 2)).transpose(1, 2)
        u, v = F.gelu(self.fc1(x)).chunk(2, dim=-1)
        x = x + self.fc2(u * self.gate_mix(v.transpose(1, 2)).transpose(1, 2))
        return self.head(x.mean(1))


def spatial_gating():
    return SpatialGating(), torch.randn(2, 3, 16, 16)


class FixedWindowScores(nn.Module):
    """A product of two activations with no channel in them (patches of the input, as halo
    attention builds with ``unfold``): its FLOPs are fixed, and still part of the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        patches = F.unfold(x, 3, padding=1)  # B, 27, H*W
        scores = patches.transpose(1, 2) @ patches  # B, H*W, H*W
        y = self.c(F.relu(self.b(F.relu(self.a(x)))))
        return y + scores.mean((1, 2))[:, None, None, None]


def fixed_window_scores():
    return FixedWindowScores(), torch.randn(1, 3, 8, 8)


class EinsumAttention(TokenMixer):
    """MaxViT-style attention written with einsum, and a 1x1 conv written as an einsum."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__(dim, heads)
        del self.mlp
        self.mix = nn.Parameter(torch.randn(24, dim) / dim ** 0.5)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.embed(x)
        y = torch.einsum("bchw,oc->bohw", x, self.mix)  # a conv in disguise: prunes 'o'
        t = x.flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = (z.reshape(b, n, self.heads, -1).transpose(1, 2)
                   for z in self.qkv(t).chunk(3, dim=-1))
        attn = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        t = t + self.proj(out)
        return self.head(y.mean((2, 3))) + t.mean(1)[:, :1]


def einsum_attention():
    return EinsumAttention(), torch.randn(2, 3, 16, 16)


class MHABlock(nn.Module):
    """A ViT block on nn.MultiheadAttention (sdpa inside; a fused fast path in eval)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 256), nn.GELU(), nn.Linear(256, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        h = self.norm(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(t)
        return self.head(t.mean(1))


def mha_block():
    return MHABlock(), torch.randn(2, 3, 16, 16)


class ClassTokenViT(nn.Module):
    """torchvision's ViT in small: a class token and position embedding (the token dim meets
    parameters, so it carries fixed atoms), run at batch 1 (a size-1 dim beside the channels
    that the heads' view splits), one attention on sdpa and one on explicit scores."""

    def __init__(self, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) / 4)
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True)
                                  for _ in range(2))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.mlp = nn.Sequential(nn.Linear(dim, 96), nn.GELU(), nn.Linear(96, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        for i, (attn, norm) in enumerate(zip(self.attn, self.norm)):
            h = norm(t)
            t = t + attn(h, h, h, need_weights=i == 1)[0]
        return self.head(t[:, 0] + self.mlp(t[:, 0]))


def class_token_vit():
    return ClassTokenViT(), torch.randn(1, 3, 16, 16)


class AutocastBlock(nn.Module):
    """Ops inside ``with torch.autocast(enabled=False)``, as timm's EfficientViT attention:
    torch.export wraps them in a higher-order op that capture inlines."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = nn.Parameter(torch.randn(64, 64) / 8)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        with torch.autocast("cpu", enabled=False):
            z = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
            z = torch.matmul(z.flatten(2), self.mix).view_as(z)  # mixes positions only
        return self.b(z)


def autocast_block():
    return AutocastBlock(), torch.randn(2, 3, 8, 8)


class ValueBranch(nn.Module):
    """Branches in Python on a tensor *value* into a layer the example never reaches: the
    analysis cannot know what that layer reads, so capture refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) if y.mean() > 1e3 else y


# ---- models as they arrive (issue "Models as they arrive") ---------------------------------
class ScriptedChild(nn.Module):
    """A torch.jit.script'ed block inside an eager model: channels flow through it, but its
    own parameters stay (its compiled code keeps them), so only what touches it is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.mid = torch.jit.script(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()))
        self.b = nn.Conv2d(16, 64, 3, padding=1)
        self.c = nn.Conv2d(64, 64, 3, padding=1)
        self.d = nn.Conv2d(64, 4, 1)

    def forward(self, x):
        return self.d(F.relu(self.c(F.relu(self.b(self.mid(F.relu(self.a(x))))))))


def scripted_child():
    return ScriptedChild(), torch.randn(1, 3, 16, 16)


def _plain_cnn() -> nn.Sequential:
    return nn.Sequential(cbr(3, 32), nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(48, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 4, 1))


def pruning_masks():
    """The tutorial workflow: torch.nn.utils.prune masks first, structured pruning next."""
    import torch.nn.utils.prune as unstructured

    model = _plain_cnn()
    unstructured.l1_unstructured(model[1], "weight", amount=0.3)
    unstructured.random_unstructured(model[3], "weight", amount=0.5)
    return model, torch.randn(1, 3, 16, 16)


def weight_norms():
    """weight_norm through parametrize, and old-style weight_norm (weight_g/weight_v)."""
    import warnings

    from torch.nn.utils.parametrizations import weight_norm

    model = _plain_cnn()
    weight_norm(model[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, and still in use
        torch.nn.utils.weight_norm(model[3])
    return model, torch.randn(1, 3, 16, 16)


def spectral_norm_cnn():
    """spectral_norm through parametrize, and old-style (weight_orig/weight_u/weight_v, still
    in many GAN codebases): sigma is recomputed on the pruned weight, so its units are
    inexact."""
    from torch.nn.utils.parametrizations import spectral_norm

    model = _plain_cnn()
    spectral_norm(model[3])
    torch.nn.utils.spectral_norm(model[1])
    return model, torch.randn(1, 3, 16, 16)


class PixelShuffleNet(nn.Module):
    """Super-resolution style: conv -> PixelShuffle(2) -> conv -> PixelUnshuffle(2) -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 64, 3, padding=1)
        self.up = nn.PixelShuffle(2)
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.down = nn.PixelUnshuffle(2)
        self.c = nn.Conv2d(128, 48, 3, padding=1)
        self.d = nn.Conv2d(48, 3, 1)

    def forward(self, x):
        return self.d(F.relu(self.c(self.down(F.relu(self.b(self.up(F.relu(self.a(x)))))))))


def pixel_shuffle():
    return PixelShuffleNet(), torch.randn(1, 3, 8, 8)


class TinyLM(nn.Module):
    """Token + position embeddings, an MLP block, and a head tied to the token embedding."""

    def __init__(self, vocab: int = 50, dim: int = 64, length: int = 12) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, length, dim) / 8)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids):
        h = self.tokens(ids) + self.position
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(h)


def embedding_lm():
    return TinyLM(), torch.randint(0, 50, (2, 12))


class Recurrent(nn.Module):
    """A stacked bidirectional LSTM, an LSTM with proj_size read through h_n, a GRU with a
    learned initial state, and Elman RNNs (tanh and relu)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 64)
        self.lstm = nn.LSTM(64, 48, num_layers=2, batch_first=True, bidirectional=True)
        self.proj = nn.LSTM(96, 64, proj_size=16, batch_first=True)
        self.gru = nn.GRU(16, 64, batch_first=True)
        self.h0 = nn.Parameter(torch.randn(1, 1, 64) / 4)
        self.rnn = nn.RNN(64, 48, batch_first=True)
        self.relu_rnn = nn.RNN(48, 40, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(40 + 16, 5)

    def forward(self, x):
        y, _ = self.lstm(F.relu(self.embed(x)))
        y, (h, _) = self.proj(y)
        y, _ = self.gru(y, self.h0.expand(-1, x.shape[0], -1).contiguous())
        y, _ = self.rnn(y)
        y, _ = self.relu_rnn(y)
        return self.head(torch.cat([y[:, -1], h[-1]], dim=1))


def recurrent():
    return Recurrent(), torch.randn(2, 6, 8)


class DeadSlice(nn.Module):
    """Channels nothing reads: x[:, :24] of a 40-channel conv drops the last 16."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 40, 3, padding=1)
        self.b = nn.Conv2d(24, 48, 3, padding=1)
        self.c = nn.Conv2d(48, 48, 3, padding=1)
        self.d = nn.Conv2d(48, 4, 1)

    def forward(self, x):
        return self.d(F.relu(self.c(F.relu(self.b(F.relu(self.a(x))[:, :24])))))


def dead_slice():
    return DeadSlice(), torch.randn(1, 3, 16, 16)


class DeformableConv(nn.Module):
    """DCNv2 (torchvision.ops.DeformConv2d) with 2 weight groups and 2 offset groups: offsets
    and mask come from convs whose channels are sampling positions (fixed)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import DeformConv2d

        self.a = cbr(3, 16)
        self.offset = nn.Conv2d(16, 2 * 2 * 9, 3, padding=1)
        self.mask = nn.Conv2d(16, 2 * 9, 3, padding=1)
        self.dcn = DeformConv2d(16, 24, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(24)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        y = self.a(x)
        z = self.dcn(y, self.offset(y) * 0.5, torch.sigmoid(self.mask(y)))
        return self.head(F.relu(self.bn(z)))


def deformable_conv():
    return DeformableConv(), torch.randn(1, 3, 12, 12)


class DeformableSampling(nn.Module):
    """Deformable attention's sampling (RT-DETR, Deformable DETR): values split into heads
    folded into the batch, sampled by ``F.grid_sample`` at points a layer predicts."""

    def __init__(self, c: int = 32, heads: int = 2, points: int = 3) -> None:
        super().__init__()
        self.heads, self.points = heads, points
        self.a = cbr(3, c)
        self.value = nn.Conv2d(c, c, 1)
        self.offsets = nn.Conv2d(c, heads * points * 2, 1)
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        y = self.a(x)
        v = self.value(y)
        b, c, h, w = v.shape
        v = v.reshape(b * self.heads, c // self.heads, h, w)
        grid = self.offsets(y).tanh().permute(0, 2, 3, 1).reshape(
            b, h * w, self.heads, self.points, 2).transpose(1, 2).reshape(
            b * self.heads, h * w, self.points, 2)
        sampled = F.grid_sample(v, grid, align_corners=False)  # (b * heads, c / heads, hw, p)
        return self.out(F.relu(sampled.mean(-1).reshape(b, c, h, w)))


def deformable_sampling():
    return DeformableSampling(), torch.randn(2, 3, 8, 8)


class GroupStd(nn.Module):
    """EvoNorm-S0 as timm writes it (``group_std``): ``x * sigmoid(v * x) / std``, the std of
    each channel group computed on a ``(B, G, C/G, H, W)`` view and expanded back as it."""

    def __init__(self, channels: int, groups: int = 4) -> None:
        super().__init__()
        self.groups = groups
        self.v = nn.Parameter(torch.rand(channels) + 0.5)
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)

    def forward(self, x):
        b, c, h, w = x.shape
        grouped = x.reshape(b, self.groups, c // self.groups, h, w)
        std = grouped.float().var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(1e-5).sqrt()
        std = std.to(x.dtype).expand(grouped.shape).reshape(b, c, h, w)
        x = x * (x * self.v.view(1, -1, 1, 1)).sigmoid() / std
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def evonorm_cnn():
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), GroupStd(64),
                          nn.Conv2d(64, 128, 3, padding=1), GroupStd(128), nn.Conv2d(128, 4, 1))
    return model, torch.randn(1, 3, 8, 8)


class UnpoolDecoder(nn.Module):
    """SegNet: the decoder unpools with the encoder's max-pool indices, whose channels are the
    encoder's, while the values unpooled are another layer's."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid, self.dec = cbr(3, 16), cbr(16, 16), cbr(16, 8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        e = self.enc(x)
        pooled, indices = F.max_pool2d(e, 2, return_indices=True)
        return self.head(self.dec(F.max_unpool2d(self.mid(pooled), indices, 2)))


def unpool_decoder():
    return UnpoolDecoder(), torch.randn(1, 3, 12, 12)


class WSConv2d(nn.Conv2d):
    """Scaled weight standardisation (NF-ResNet, NFNet): each filter normalised over its
    fan-in by batch_norm on the flattened weight, times a per-filter gain and a fan-in scale."""

    def __init__(self, cin: int, cout: int, k: int = 3, **kwargs) -> None:
        super().__init__(cin, cout, k, padding=k // 2, **kwargs)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale = (cin // self.groups * k * k) ** -0.5

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WeightStandardized(nn.Module):
    """Two standardised convs (one grouped) in a residual block, then plain convs: the in-channel
    side of a standardised conv is inexact (its statistics run over the fan-in)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = WSConv2d(3, 32)
        self.a = WSConv2d(32, 48)
        self.b = WSConv2d(48, 32, groups=4)
        self.c = nn.Conv2d(32, 40, 3, padding=1)
        self.d = nn.Conv2d(40, 10, 1)

    def forward(self, x):
        x = F.gelu(self.stem(x))
        x = x + self.b(F.gelu(self.a(x)))
        return self.d(F.relu(self.c(x)))


def weight_standardized():
    return WeightStandardized(), torch.randn(1, 3, 16, 16)


class StoredHeadAttention(nn.Module):
    """timm's ``Attention``: q/k/v split by the stored ``num_heads`` and ``head_dim``, merged back
    by the stored ``attn_dim``, scores scaled by a stored ``scale``."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.attn_dim))


class StoredHeads(nn.Module):
    """Patch embedding, a residual stored-head attention and MLP, mean-pooled head."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.attn = StoredHeadAttention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def stored_heads():
    return StoredHeads(), torch.randn(2, 3, 16, 16)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryAttention(nn.Module):
    """Gemma-style attention: separate q/k/v views by stored head sizes, a norm over each
    head's width, rotary tables of the head width (fixed by the positions, not the plan),
    sdpa, and ``reshape(B, N, -1)`` back: the head width cannot shrink, whole heads can."""

    def __init__(self, dim: int = 32, num_heads: int = 4, tokens: int = 16,
                 head_dim: int = 16) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        width = num_heads * self.head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, width) for _ in range(3))
        self.o_proj = nn.Linear(width, dim)
        self.q_norm = nn.LayerNorm(self.head_dim)
        angle = torch.arange(tokens)[:, None] / 10 ** (torch.arange(head_dim) / head_dim * 2)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = self.q_norm(q)
        q, k = ((t * self.cos + _rotate_half(t) * self.sin) for t in (q, k))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(x.transpose(1, 2).reshape(b, n, -1))


class RotaryViT(StoredHeads):
    """StoredHeads with two rotary attention blocks."""

    def __init__(self, dim: int = 32, num_heads: int = 4, head_dim: int = 16) -> None:
        super().__init__(dim)
        self.attn = nn.Sequential(*(RotaryAttention(dim, num_heads, head_dim=head_dim)
                                    for _ in range(2)))

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.attn:
            x = x + block(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def rotary_vit():
    return RotaryViT(), torch.randn(2, 3, 16, 16)


ARRIVING: dict[str, Callable] = {
    "scripted_child": scripted_child,
    "pixel_shuffle": pixel_shuffle,
    "embedding_lm": embedding_lm,
    "recurrent": recurrent,
    "dead_slice": dead_slice,
    "deformable_conv": deformable_conv,
    "deformable_sampling": deformable_sampling,
    "unpool_decoder": unpool_decoder,
}

# Reparametrized weights: prune() lifts them (pruners.reparam); the lower-level stages
# (capture/analyze/remove_units) see the reparametrization's own tensors, so these are
# checked through prune() in tests/test_arriving.py rather than in every MODELS test.
REPARAM: dict[str, Callable] = {
    "pruning_masks": pruning_masks,
    "weight_norms": weight_norms,
    "spectral_norm": spectral_norm_cnn,
}


MODELS: dict[str, Callable] = {
    "autocast_block": autocast_block,
    "einsum_attention": einsum_attention,
    "mha_block": mha_block,
    "class_token_vit": class_token_vit,
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "vgg": vgg,
    "mobilenet_v2": mobilenet_v2,
    "densenet": densenet,
    "c2f_sppf": c2f_sppf,
    "squeeze_excite": squeeze_excite,
    "resnext": resnext,
    "fpn": fpn,
    "shared_conv": shared_conv,
    "conv_transpose": conv_transpose,
    "shufflenet": shufflenet,
    "depthwise_multiplier": depthwise_multiplier,
    "conv1d_conv3d": conv1d_conv3d,
    "norms": norms,
    "token_mixer": token_mixer,
    "spatial_gating": spatial_gating,
    "fixed_window_scores": fixed_window_scores,
    "weight_standardized": weight_standardized,
    "stored_heads": stored_heads,
    "rotary_vit": rotary_vit,
    **ARRIVING,
}


def build(name: str, seed: int = 0):
    """Build a model in eval mode with randomised batch-norm statistics."""
    torch.manual_seed(seed)
    model, x = MODELS[name]()
    randomize_bn(model)
    return model.eval(), x


def randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def snapshot(model: nn.Module) -> tuple:
    """Weights, mode and public attributes: what prune() must leave as it found them."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            {k: v for k, v in vars(model).items() if not k.startswith("_")})


def shares_memory(a: nn.Module, b: nn.Module) -> list[str]:
    """Names of ``a``'s parameters and buffers that use memory of ``b``'s (a pruned result must
    own every tensor: training it must not write into the model it came from)."""
    theirs = {t.untyped_storage().data_ptr() for t in [*b.parameters(), *b.buffers()]
              if t.numel()}
    return [n for n, t in [*a.named_parameters(), *a.named_buffers()]
            if t.numel() and t.untyped_storage().data_ptr() in theirs]


def unchanged(model: nn.Module, before: tuple) -> bool:
    state, training, attrs = before
    now = model.state_dict()
    return (now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
            and model.training == training
            and {k: v for k, v in vars(model).items() if not k.startswith("_")} == attrs)
