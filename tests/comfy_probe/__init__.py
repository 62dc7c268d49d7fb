"""A test-only ComfyUI node pack, installed next to the HDM pack by tests/comfy_harness.py: nodes that record what
the HDM model hands to ComfyUI's block-patch and attention machinery, one JSON line per event in the file `log`."""
import json

import torch


def record(path, **entry):
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


class Probe:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "log": ("STRING", {"default": ""})}}


class HDMProbeBlockPatch(Probe):
    """patches_replace["dit"][("double_block", i)] on every block: records what the patch receives, runs the
    original block."""

    def patch(self, model, log):
        m = model.clone()
        for i in range(len(m.model.diffusion_model.block_names)):
            def replace(args, extra, i=i):
                to = args["transformer_options"]
                record(log, key=i, block_index=to["block_index"], total_blocks=to["total_blocks"],
                       block_type=to["block_type"], name=to["hdm_block"], img=list(args["img"].shape),
                       cross=args["memory"] is not None)
                return extra["original_block"](args)
            m.set_model_patch_replace(replace, "dit", "double_block", i)
        return (m,)


class HDMProbeAttentionOverride(Probe):
    """transformer_options["optimized_attention_override"]: records the backend ComfyUI chose, then calls it."""

    def patch(self, model, log):
        m = model.clone()

        def override(func, *args, **kwargs):
            to = kwargs.get("transformer_options") or {}
            record(log, func=func.__name__, block_index=to.get("block_index"), q=list(args[0].shape))
            return func(*args, **kwargs)
        m.model_options["transformer_options"]["optimized_attention_override"] = override
        return (m,)


class HDMProbeMaskedAttention(Probe):
    """The loaded network with a padded context and ctx_mask, through ComfyUI's attention: records how far the
    padded prompt's output is from the unpadded prompt alone (the mask must hide the padding), and without it."""

    RETURN_TYPES = ()
    OUTPUT_NODE = True

    def patch(self, model, log):
        net = model.model.diffusion_model
        xut_forward = super(type(net), net).forward
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, net.config.input_dim, 8, 8, generator=g), torch.rand(2, generator=g)
        ctx = torch.randn(2, 5, net.config.ctx_dim, generator=g)
        ctx[1, 2:] = 100.0
        mask = torch.ones(2, 5, dtype=torch.bool)
        mask[1, 2:] = False
        with torch.no_grad():
            masked = xut_forward(x, t, ctx, ctx_mask=mask, attn_options={"transformer_options": {}})
            alone = xut_forward(x[1:], t[1:], ctx[1:, :2], attn_options={"transformer_options": {}})
            unmasked = xut_forward(x, t, ctx, attn_options={"transformer_options": {}})
        record(log, masked=(masked[1:] - alone).abs().max().item(), unmasked=(unmasked[1:] - alone).abs().max().item())
        return {}


class HDMProbePatches:
    """The weight patches a MODEL (and optionally a CLIP) carries, e.g. after LoraLoader: records {state-dict key:
    [patch kind, ...]} for each, the kind being the weight adapter's name ("lora", "lokr", ...) or the tuple
    patch's tag ("diff" for LyCORIS w_norm / b_norm)."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "log": ("STRING", {"default": ""})},
                "optional": {"clip": ("CLIP",)}}

    @staticmethod
    def kinds(patches):
        return {key: [getattr(p[1], "name", None) or p[1][0] for p in entries] for key, entries in patches.items()}

    def patch(self, model, log, clip=None):
        record(log, model=self.kinds(model.patches), clip=None if clip is None else self.kinds(clip.patcher.patches))
        return {}


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (HDMProbeBlockPatch, HDMProbeAttentionOverride, HDMProbeMaskedAttention,
                                                HDMProbePatches)}
