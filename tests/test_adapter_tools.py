"""LyCORIS-made adapters through our key format, `python -m hdm_core.merge` and `python -m hdm_core.convert_lycoris`
on the tiny model."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import uuid

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from hdm_core import PRESETS, XUT
from hdm_core.adapters import apply_adapters, load_adapter, save_adapter
from hdm_core.checkpoint import load_components, save_single_file
from hdm_core.convert_lycoris import SOURCE_KEY
from hdm_core.convert_lycoris import main as convert_main
from hdm_core.layers import RMSNorm
from hdm_core.layout import LORA_TE_PREFIX, LORA_UNET_PREFIX
from hdm_core.merge import MERGED_KEY
from hdm_core.merge import main as merge_main
from hdm_core.text_encoder import TextEncoder

LINEAR = "backbone.enc_blocks.0.0.attn.qkv"


@pytest.fixture(scope="module")
def model(tiny_parts) -> XUT:
    m = XUT(PRESETS["xut-tiny"]).eval()
    m.load_state_dict(tiny_parts["unet"])
    return m


def output(m: XUT, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g, dtype=dtype)
    ctx = torch.randn(1, 5, m.config.ctx_dim, generator=g, dtype=dtype)
    with torch.no_grad():
        return m(x, torch.tensor([0.5], dtype=dtype), ctx)


def lycoris(root: torch.nn.Module, preset: dict, seed: int = 1, **kwargs):
    """A LyCORIS network applied to `root` (forwards patched), its parameters random. The preset is class state in
    LyCORIS: every key is set here. Built by LycorisNetwork itself, because create_lycoris applies its own "full"
    preset (target modules "Block", "TimestepEmbedding", ...) on top of whatever was set."""
    from lycoris import LycorisNetwork
    from lycoris.logging import logger

    logger.setLevel(logging.WARNING)
    LycorisNetwork.apply_preset({"enable_conv": True, "target_name": [], "use_fnmatch": True, "module_algo_map": {},
                                 "name_algo_map": {}, "exclude_name": [], "lora_prefix": "lycoris", **preset})
    net = LycorisNetwork(root, warn_on_unmatched=False, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def export(net, root: torch.nn.Module, prefix: str = LORA_UNET_PREFIX) -> dict[str, torch.Tensor]:
    """LyCORIS tensors renamed to `<prefix><module path>.<tensor>` (what the trainer's export does)."""
    where = {id(m): path for path, m in root.named_modules()}
    return {f"{prefix}{where[id(lo.org_module[0])]}.{k}": v.detach().clone()
            for lo in net.loras for k, v in lo.state_dict().items()}


def test_lycoris_train_norm_network_matches_after_export(model, monkeypatch):
    """LoRA on every Linear plus LyCORIS norm adapters (w_norm on the RMSNorms, w_norm + b_norm on the adaLN
    LayerNorms) equal their merge. In float64 (the merge too), so the comparison measures the key mapping and the
    math rather than the order of float32 sums (in fp32 the two differ by ~2e-5 on these outputs of size ~15)."""
    if not hasattr(RMSNorm, "_norm"):
        monkeypatch.setattr(RMSNorm, "_norm", lambda self, x: F.rms_norm(x, x.shape[-1:], None, self.eps),
                            raising=False)
    base = copy.deepcopy(model).double()
    wrapped = copy.deepcopy(base)
    net = lycoris(wrapped, {"target_module": ["Linear", "LayerNorm", "RMSNorm"]}, lora_dim=4, alpha=2.0,
                  network_module="lora", train_norm=True).double()
    sd = export(net, wrapped)
    assert sum(k.endswith(".w_norm") for k in sd) == 23 and sum(k.endswith(".b_norm") for k in sd) == 3
    expected = output(wrapped, torch.float64)
    got = output(apply_adapters(base, [(sd, 1.0)]), torch.float64)
    assert (got - expected).abs().max() <= 1e-5 < (output(model).double() - expected).abs().max()


@pytest.mark.parametrize("algo, kwargs", [("loha", {}), ("lokr", {"factor": 4})])
def test_loha_and_low_rank_lokr_match_the_training_forward(model, algo, kwargs):
    """LoHa and a low-rank LoKr (alpha 2, dim 4) exported and merged give what the LyCORIS network computes while
    training; LyCORIS 4.1.3's own merge (get_diff_weight) applies alpha / dim once more (docs/adapters.md)."""
    wrapped = copy.deepcopy(model).double()
    net = lycoris(wrapped, {"target_module": ["Linear"]}, lora_dim=4, alpha=2.0, network_module=algo, **kwargs)
    net = net.double()
    sd = export(net, wrapped)
    merged = apply_adapters(copy.deepcopy(model).double(), [(sd, 1.0)])
    assert (output(merged, torch.float64) - output(wrapped, torch.float64)).abs().max() <= 1e-5
    lo = next(lo for lo in net.loras if lo.scale != 1.0)
    path = {id(m): p for p, m in wrapped.named_modules()}[id(lo.org_module[0])]
    ours = merged.state_dict()[f"{path}.weight"] - model.state_dict()[f"{path}.weight"].double()
    theirs = lo.get_diff_weight(multiplier=1, shape=ours.shape)[0]
    torch.testing.assert_close(theirs, ours * lo.scale)  # alpha / dim twice


# ---------------------------------------------------------------------------------------------------
# hdm_core.merge
# ---------------------------------------------------------------------------------------------------

def adapter(model: XUT, te: TextEncoder) -> dict[str, torch.Tensor]:
    """LoRA on a Linear, w_norm / b_norm on a LayerNorm, LoRA on a Qwen3 projection."""
    g, w = torch.Generator().manual_seed(3), model.state_dict()[LINEAR + ".weight"]
    q = te.model.state_dict()["layers.0.self_attn.q_proj.weight"]
    return {f"{LORA_UNET_PREFIX}{LINEAR}.lora_up.weight": torch.randn(w.shape[0], 4, generator=g) * 0.2,
            f"{LORA_UNET_PREFIX}{LINEAR}.lora_down.weight": torch.randn(4, w.shape[1], generator=g) * 0.2,
            f"{LORA_UNET_PREFIX}shared_adaln_ffw.0.w_norm": torch.randn(64, generator=g) * 0.2,
            f"{LORA_UNET_PREFIX}shared_adaln_ffw.0.b_norm": torch.randn(64, generator=g) * 0.2,
            f"{LORA_TE_PREFIX}layers.0.self_attn.q_proj.lora_up.weight": torch.randn(q.shape[0], 2, generator=g),
            f"{LORA_TE_PREFIX}layers.0.self_attn.q_proj.lora_down.weight": torch.randn(2, q.shape[1], generator=g)}


@pytest.fixture(scope="module")
def merge_inputs(tiny_parts, tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    comps = load_components(tiny_checkpoint)
    a = save_adapter(folder / "a.safetensors", adapter(comps.model, comps.text_encoder))
    b = save_adapter(folder / "b.safetensors", {k: v for k, v in adapter(comps.model, comps.text_encoder).items()
                                                if k.startswith(LORA_UNET_PREFIX + LINEAR)})
    return folder, comps, a, b


def test_merge_equals_apply_adapters_and_copies_the_rest(merge_inputs, tiny_checkpoint, capsys):
    folder, comps, a, b = merge_inputs
    out = folder / "merged.safetensors"
    assert merge_main([str(tiny_checkpoint), str(out), "--lora", f"{a}:0.7", "--lora", f"{b}:-0.3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    merged = load_components(out)
    ref = copy.deepcopy(comps)
    apply_adapters(ref.model, [(a, 0.7), (b, -0.3)], text_encoder=ref.text_encoder)
    assert (output(merged.model) - output(ref.model)).abs().max() <= 1e-5
    assert (merged.text_encoder.encode("a cat")[0] - ref.text_encoder.encode("a cat")[0]).abs().max() <= 1e-5
    assert (output(merged.model) - output(comps.model)).abs().max() > 1e-3

    touched = {f"unet.model.{LINEAR}.weight", "unet.model.shared_adaln_ffw.0.weight",
               "unet.model.shared_adaln_ffw.0.bias", "te.text_models.0.layers.0.self_attn.q_proj.weight"}
    with safe_open(str(tiny_checkpoint), "pt") as fb, safe_open(str(out), "pt") as fo:
        assert set(fb.keys()) == set(fo.keys())
        for key in fb.keys():
            x, y = fb.get_tensor(key), fo.get_tensor(key)
            assert x.dtype == y.dtype and torch.equal(x, y) != (key in touched), key
        meta = fo.metadata()
    assert {k: v for k, v in meta.items() if k != MERGED_KEY} == fb_metadata(tiny_checkpoint)
    assert [(r["file"], r["strength"]) for r in json.loads(meta[MERGED_KEY])] == [("a.safetensors", 0.7),
                                                                                   ("b.safetensors", -0.3)]


def fb_metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_merge_keeps_dtypes(merge_inputs, tiny_parts):
    folder, _, a, _ = merge_inputs
    base, out = folder / "half.safetensors", folder / "half_merged.safetensors"
    save_single_file(base, tiny_parts["unet"], tiny_parts["config"], te_sd=tiny_parts["te"], dtype=torch.bfloat16)
    assert merge_main([str(base), str(out), "--lora", str(a)]) == 0
    with safe_open(str(out), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert merge_main([str(out), str(folder / "twice.safetensors"), "--lora", str(a)]) == 0
    assert len(json.loads(fb_metadata(folder / "twice.safetensors")[MERGED_KEY])) == 2


def test_merge_refuses_bad_inputs_and_writes_nothing(merge_inputs, tiny_checkpoint, tiny_parts, capsys):
    folder, comps, a, _ = merge_inputs
    base_bytes = tiny_checkpoint.read_bytes()
    pickle = folder / "base.pt"
    torch.save({"x": torch.zeros(1)}, pickle)
    (folder / "a_file").write_text("x")
    dm_only = folder / "dm_only.safetensors"
    save_single_file(dm_only, tiny_parts["unet"], tiny_parts["config"])
    other = save_adapter(folder / "other.safetensors", {"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight":
                                                       torch.zeros(4, 1), "diffusion_model.double_blocks.0.img_attn."
                                                       "qkv.lora_down.weight": torch.zeros(1, 4)})
    out = folder / "out.safetensors"
    cases = [([str(pickle), str(out)], "base.pt is a pickle file"),
             ([str(folder / "nope.safetensors"), str(out)], "nope.safetensors: no such file"),
             ([str(tiny_checkpoint), str(out), "--lora", str(folder / "gone.safetensors")], "gone.safetensors"),
             ([str(tiny_checkpoint), str(out), "--lora", str(other)], "double_blocks.0.img_attn"),
             ([str(dm_only), str(out), "--lora", str(a)], "no text encoder was given"),
             ([str(tiny_checkpoint), str(tiny_checkpoint), "--lora", str(a)], "is the input"),
             ([str(tiny_checkpoint), str(a), "--lora", str(a)], "is the input"),
             ([str(tiny_checkpoint), str(folder / "a_file" / "out.safetensors"), "--lora", str(a)], "a_file"),
             ([str(tiny_checkpoint), str(folder / "out.ckpt"), "--lora", str(a)], "out.ckpt")]
    for argv, message in cases:
        argv = argv if "--lora" in argv else [*argv, "--lora", str(a)]
        assert merge_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (message, err)
        assert not out.exists() and not (folder / "out.ckpt").exists()
    assert tiny_checkpoint.read_bytes() == base_bytes
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []


# ---------------------------------------------------------------------------------------------------
# hdm_core.convert_lycoris
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lycoris_pt(model, tiny_parts, tmp_path_factory):
    """A LoKr .pt saved by LyCORIS on the tiny XUT (float64, see above), and a LoRA one on the tiny Qwen3 whose
    keys start lycoris_te_; with the wrapped modules' outputs."""
    folder = tmp_path_factory.mktemp("lycoris")
    wrapped = copy.deepcopy(model).double()
    net = lycoris(wrapped, {"target_module": ["Linear"]}, lora_dim=4, alpha=2.0, network_module="lokr", factor=4,
                  full_matrix=True).double()
    te = TextEncoder.from_state_dict({k: v.clone() for k, v in tiny_parts["te"].items()})
    te_net = lycoris(te.model, {"target_module": ["Linear"], "lora_prefix": "lycoris_te"}, seed=2, lora_dim=2,
                     alpha=1.0, network_module="lora")
    torch.save(net.state_dict(), folder / "xut.pt")
    torch.save({"state_dict": {**{k.replace("lycoris_", "lycoris_model_"): v for k, v in net.state_dict().items()},
                               **te_net.state_dict()}}, folder / "both.pt")
    return folder, output(wrapped, torch.float64), te.encode("a cat")[0]


def test_convert_matches_the_lycoris_network(model, lycoris_pt, tiny_checkpoint, tiny_parts):
    folder, xut_out, te_out = lycoris_pt
    out = folder / "xut.safetensors"
    assert convert_main([str(folder / "xut.pt"), str(out), "--allow-pickle", "--preset", "xut-tiny"]) == 0
    sd = load_adapter(out)
    assert all(k.startswith(LORA_UNET_PREFIX) and k.endswith((".lokr_w1", ".lokr_w2", ".alpha")) for k in sd)
    got = output(apply_adapters(copy.deepcopy(model).double(), [(out, 1.0)]), torch.float64)
    assert (got - xut_out).abs().max() <= 1e-5
    source = json.loads(fb_metadata(out)[SOURCE_KEY])
    assert source["file"] == "xut.pt" and source["xut"] == "xut-tiny" and len(source["sha256"]) == 64
    assert source["sha256"] == hashlib.sha256((folder / "xut.pt").read_bytes()).hexdigest()

    both = folder / "both.safetensors"  # a {"state_dict": ...} wrapper, model_ before the paths, te_ keys
    assert convert_main([str(folder / "both.pt"), str(both), "--allow-pickle", "--base", str(tiny_checkpoint)]) == 0
    m = copy.deepcopy(model).double()
    te = TextEncoder.from_state_dict({k: v.clone() for k, v in tiny_parts["te"].items()})  # changed in place below
    apply_adapters(m, [(both, 1.0)], text_encoder=te)
    assert (output(m, torch.float64) - xut_out).abs().max() <= 1e-5
    assert (te.encode("a cat")[0] - te_out).abs().max() <= 1e-5


def test_convert_refuses_without_allow_pickle_and_unmapped_keys(lycoris_pt, capsys):
    folder, _, _ = lycoris_pt
    out = folder / "refused.safetensors"
    assert convert_main([str(folder / "xut.pt"), str(out), "--preset", "xut-tiny"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not out.exists()

    sd = torch.load(folder / "xut.pt", weights_only=True)
    module = f"lycoris_{LINEAR.replace('.', '_')}"
    for extra, message in (({"lycoris_no_such_module.lokr_w1": torch.zeros(2, 2)}, "1 of"),
                           ({f"{module}.dora_scale": torch.zeros(1)}, "1 keys are DoRA"),
                           ({f"{module}.lokr_t2": torch.zeros(2, 2, 1, 1)}, "1 keys are Tucker")):
        torch.save({**sd, **extra}, folder / "bad.pt")
        assert convert_main([str(folder / "bad.pt"), str(out), "--allow-pickle", "--preset", "xut-tiny"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: bad.pt: ") and message in err and next(iter(extra)) in err, err
        assert err.count("\n") == 1 and not out.exists()
    # the right names at the wrong size: a base-sized adapter for the tiny XUT
    assert convert_main([str(folder / "xut.pt"), str(out), "--allow-pickle", "--preset", "xut-base"]) == 2
    assert "does not fit the weight" in capsys.readouterr().err and not out.exists()
    torch.save([1, 2], folder / "list.pt")
    assert convert_main([str(folder / "list.pt"), str(out), "--allow-pickle"]) == 2
    assert "list.pt holds a list, not a dict of tensors" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------------------------------------
# The same keys through ComfyUI's stock LoraLoader (skipped unless COMFYUI_PATH is set)
# ---------------------------------------------------------------------------------------------------

def test_stock_lora_loader_reads_text_encoder_and_norm_keys(request, tmp_path_factory):
    """ComfyUI's LoraLoader maps our text-encoder prefix and applies w_norm / b_norm / diff / diff_b as
    apply_adapters does: the sampled latent equals hdm_core's (fp32), and no key is left unloaded."""
    from comfy_harness import CKPT, HDM_SAMPLER, NEG, POS, normalise, saved_latent, session, txt2img_graph

    from hdm_core.pipeline import GenerationParams, generate

    s = session(request, tmp_path_factory)
    fresh = lambda: load_components(s.models["checkpoints"] / CKPT, dtype=torch.float32)  # noqa: E731
    comps = fresh()
    g, weights = torch.Generator().manual_seed(9), comps.model.state_dict()
    sd = {k: v for k, v in adapter(comps.model, comps.text_encoder).items() if "lora_" not in k or "text" in k}
    sd[f"{LORA_UNET_PREFIX}shared_adaln_attn.1.diff"] = torch.randn(weights["shared_adaln_attn.1.weight"].shape,
                                                                generator=g) * 0.05
    sd[f"{LORA_UNET_PREFIX}shared_adaln_attn.1.diff_b"] = torch.randn(weights["shared_adaln_attn.1.bias"].shape,
                                                                  generator=g) * 0.05
    name = f"hdm_te_norm_{uuid.uuid4().hex[:8]}.safetensors"
    save_adapter(s.server.base / "models" / "loras" / name, sd)
    graph = txt2img_graph(sampler=("HDMSampler", HDM_SAMPLER))
    graph["11"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                          "strength_model": 0.7, "strength_clip": 0.7}}
    graph["2"]["inputs"]["clip"] = graph["3"]["inputs"]["clip"] = ["11", 1]
    graph["6"]["inputs"]["model"] = ["11", 0]
    start = len(s.server.log.read_text())
    got = normalise(saved_latent(s.server, s.server.run(graph)), s.models)

    params = GenerationParams(prompt=POS, negative_prompt=NEG, width=192, height=128, steps=4, cfg=3.0, seed=42)
    plain = generate(comps, params, decode=False)
    want = generate(comps, params, decode=False, loras=[(sd, 0.7)])
    clip_only = generate(comps, params, decode=False, loras=[({k: v for k, v in sd.items() if "text" in k}, 0.7)])
    err = (got - want).abs().max().item()
    print(f"LoraLoader (text encoder + norm + diff keys) vs hdm_core: max-abs {err:.2e}")
    assert err <= 1e-4 and (want - plain).abs().max() > 1e-2 and (clip_only - plain).abs().max() > 1e-2
    log = s.server.log.read_text()[start:]
    assert "lora key not loaded" not in log and "ERROR" not in log, log[-2000:]
