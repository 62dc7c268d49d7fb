"""A test-only ComfyUI node pack, installed next to the HDM pack by tests/comfy_harness.py: nodes that record what
the HDM model hands to ComfyUI's block-patch and attention machinery, one JSON line per event in the file `log`."""
import json
import sys

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


class HDMProbeModelCalls(Probe):
    """A DIFFUSION_MODEL wrapper that records, for every call of the HDM network, the input shape, whether autograd
    is recording, and the extra conditioning it receives (camera keys, tread_gamma), then runs the call."""

    def patch(self, model, log):
        import comfy.patcher_extension

        def wrapper(executor, x, timesteps, context, control, transformer_options, **kwargs):
            camera = {k: kwargs[k].flatten().tolist() for k in ("x_shift", "y_shift", "zoom") if k in kwargs}
            record(log, x=list(x.shape), grad=torch.is_grad_enabled(), inference=torch.is_inference_mode_enabled(),
                   keys=sorted(kwargs), camera=camera, tread_gamma=kwargs.get("tread_gamma"),
                   context=None if context is None else list(context.shape))
            return executor(x, timesteps, context, control, transformer_options, **kwargs)
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "hdm_probe", wrapper)
        return (m,)


class HDMProbeLossMap:
    """Records the loss history of TrainLoraNode (its LOSS_MAP output) as one line {"loss": [...]}."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "record"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"loss": ("LOSS_MAP",), "log": ("STRING", {"default": ""})}}

    def record(self, loss, log):
        record(log, loss=[float(v) for v in loss["loss"]])
        return {}


class HDMProbePositions(Probe):
    """Records, for every model call, the latent-resolution position map and aspect the HDM model hands XUT (the
    output of the pack's `call_positions`, wrapped once; recording only for models that went through this node)."""

    def patch(self, model, log):
        glue = sys.modules[type(model.model.diffusion_model).__module__]
        if not getattr(glue.call_positions, "probe", False):
            inner = glue.call_positions

            def recording(x, conds, transformer_options, *args):
                out = inner(x, conds, transformer_options, *args)
                if transformer_options.get("hdm_probe_positions"):
                    record(transformer_options["hdm_probe_positions"], x=list(x.shape), pos=out[0].tolist(),
                           aspect=out[1].tolist())
                return out
            recording.probe = True
            glue.call_positions = recording
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})["hdm_probe_positions"] = log
        return (m,)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (HDMProbeBlockPatch, HDMProbeAttentionOverride, HDMProbeMaskedAttention,
                                                HDMProbePatches, HDMProbeModelCalls, HDMProbeLossMap,
                                                HDMProbePositions)}
