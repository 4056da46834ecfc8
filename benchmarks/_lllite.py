"""bench_hook.py --lllite: per UNet step, our ControlNet-LLLite pre-hooks against the peer, kohya's definition as
wrapper modules around the same q/k/v layers (embedding precomputed on both sides, as both compute it once per
job), and the added cost of LLLite beside a ControlNet's on the same UNet.

The LLLite file is written in kohya's layout at its released sizes (cond_emb 32, mlp 64; attn1 q/k/v and attn2 q
of every encoder and middle-block transformer) with random weights, then loaded by our loader.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

COND, MLP = 32, 64
PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")


def _targets(unet) -> dict[str, torch.nn.Module]:
    """{ldm name: diffusers layer} for the projections released LLLite files condition (encoder + middle)."""
    from lib_controlnet.models.kinds.base_unet import ldm_modules

    return {name: layer for name, layer in ldm_modules(unet).items()
            if name.startswith(("input_blocks.", "middle_block.")) and name.endswith(PROJECTIONS)}


def _depth(name: str) -> int:
    block = int(name.split(".")[1]) if name.startswith("input_blocks.") else 9
    return 1 if block <= 2 else 2 if block <= 5 else 3


def write_file(unet, path: Path) -> dict:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, layer in _targets(unet).items():
        key = "lllite_unet_" + name.replace(".", "_")
        half = COND // 2
        convs = {1: [(half, 3, 4), (COND, half, 2)], 2: [(half, 3, 4), (COND, half, 4)],
                 3: [(half, 3, 4), (half, half, 4), (COND, half, 2)]}[_depth(name)]
        for i, (out_c, in_c, k) in enumerate(convs):
            tensors[f"{key}.conditioning1.{2 * i}.weight"] = torch.randn(out_c, in_c, k, k, generator=generator) * 0.1
            tensors[f"{key}.conditioning1.{2 * i}.bias"] = torch.zeros(out_c)
        width = layer.in_features
        for part, (out_f, in_f) in (("down", (MLP, width)), ("mid", (MLP, MLP + COND)), ("up", (width, MLP))):
            tensors[f"{key}.{part}.0.weight"] = torch.randn(out_f, in_f, generator=generator) * 0.02
            tensors[f"{key}.{part}.0.bias"] = torch.zeros(out_f)
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return tensors


class _Peer(torch.nn.Module):
    """kohya's definition around one layer: org(x + up(relu(mid(cat([e, relu(down(x))])))) * multiplier)."""

    def __init__(self, org, module, embedding, multiplier):
        super().__init__()
        self.org, self.module, self.multiplier = org, module, multiplier
        self.e = embedding.flatten(2).permute(0, 2, 1)

    def forward(self, x):
        m = self.module
        e = self.e.repeat(x.shape[0] // self.e.shape[0], 1, 1)
        h = torch.cat([e, F.relu(F.linear(x, m.down[0].weight, m.down[0].bias))], dim=2)
        h = F.relu(F.linear(h, m.mid[0].weight, m.mid[0].bias))
        return self.org(x + F.linear(h, m.up[0].weight, m.up[0].bias) * self.multiplier)


def run(args, components, controlnet) -> None:
    from lib_controlnet.control import ControlJob, Controller, PreparedUnit, RowLayout
    from lib_controlnet.hosts import diffusers as host
    from lib_controlnet.models import load_control_model
    from lib_controlnet.unit import ControlUnit

    unet = components["unet"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench_controllllite_xl.safetensors"
        write_file(unet, path)
        model = load_control_model(path)
    latent = args.image // 8
    x = torch.randn(2, 4, latent, latent)
    t = torch.tensor(500)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    hint = torch.rand(1, 3, args.image, args.image)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = dict(added_cond_kwargs=dict(text_embeds=torch.randn(2, pooled), time_ids=torch.tensor(
        [[args.image] * 2 + [0, 0] + [args.image] * 2] * 2, dtype=torch.float32)))
    peer = copy.deepcopy(unet)
    by_spelling = {"lllite_unet_" + name.replace(".", "_"): layer for name, layer in _targets(peer).items()}
    modules = dict(peer.named_modules())
    names_of = {id(module): name for name, module in modules.items()}
    with torch.no_grad():
        for target, module in zip(model.targets, model.blocks):
            layer = by_spelling[target]
            owner, child = names_of[id(layer)].rsplit(".", 1)
            setattr(modules[owner], child, _Peer(layer, module, module.embed(hint), 1.0))

    def controller(m):
        job = ControlJob(units=[PreparedUnit(ControlUnit(module="none", model="bench"), m, hint)], width=args.image,
                         height=args.image, steps=10)
        return Controller(job)

    times = {"plain": [], "peer": [], "ours": [], "controlnet": []}
    lllite_controller, controlnet_controller = controller(model), controller(controlnet)
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first round warms up (and computes the embeddings)
            start = time.perf_counter()
            unet(x, t, context, **added)
            times["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            peer(x, t, context, **added)
            times["peer"].append(time.perf_counter() - start)
            for name, ctrl in (("ours", lllite_controller), ("controlnet", controlnet_controller)):
                with host.hooked(unet, ctrl):
                    ctrl.begin_step(0, 10, RowLayout.diffusers_cfg(1))
                    unet(x, t, context, **added)  # the job's first call computes its embedding, once
                    start = time.perf_counter()
                    unet(x, t, context, **added)
                    times[name].append(time.perf_counter() - start)
    step = {name: statistics.median(values[1:]) for name, values in times.items()}
    print(f"LLLite: {len(model.blocks)} modules, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    print(f"per UNet call: plain {step['plain']:.3f}s, peer (wrapped layers) {step['peer']:.3f}s, ours (pre-hooks) "
          f"{step['ours']:.3f}s, ControlNet hooked {step['controlnet']:.3f}s")
    print(f"lllite ratio             {step['ours'] / step['peer']:.3f}  "
          "(ours / the wrapped definition, target <= 1.02)")
    added_lllite, added_controlnet = step["ours"] - step["plain"], step["controlnet"] - step["plain"]
    print(f"added per step           LLLite {added_lllite:.3f}s vs ControlNet {added_controlnet:.3f}s "
          f"({added_lllite / added_controlnet:.2f} of it)")
