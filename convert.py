"""
Checkpoint key names of other formats -> ours (diffusers / transformers names), by a few string rules each. Machinery
a tutorial reader can skip: unet.load_sd reads single-file checkpoints through it, eval.py reads HPSv2's OpenCLIP file.

    ldm_key / convert_ldm_checkpoint / convert_to_ldm   single-file SD1.x / SD2.x / SDXL checkpoints (LDM / SGM names)
    openclip_to_ours                                    an OpenCLIP CLIP state dict (q, k, v fused) -> CLIPModel names
"""
import torch

from files import LoadError


def per_block(v, n):
    """diffusers allows an int (same for every block) or a per-block list for several UNet fields."""
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def legacy_keys(weights):
    """Older saved VAEs name the mid-block attention query/key/value/proj_attn (sometimes as 1x1 convs);
    old CLIP checkpoints carry a position_ids buffer. Bring both to the current names."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in weights.items():
        if k.endswith("position_ids"):
            continue
        for a, b in renames.items():
            if a in k and ".attentions." in k:
                k = k.replace(a, b)
                v = v.reshape(v.shape[:2]) if v.ndim == 4 else v
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Single-file checkpoints (original LDM / SGM key names) -> diffusers / transformers key names
# Original (LDM / SGM) checkpoints name the same tensors differently. One function maps each of our (diffusers /
# transformers) keys to its original name; loading looks every expected key up through it, and tests use it to
# write single files. The UNet's input_blocks / output_blocks number the resnet+attention layers and samplers of
# all levels consecutively; the VAE decoder's up blocks are stored deepest-last; OpenCLIP fuses q, k, v.

LDM_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              ("text_encoder", "sd15"): "cond_stage_model.transformer.",
              ("text_encoder", "sd2"): "cond_stage_model.model.",
              ("text_encoder", "sdxl"): "conditioner.embedders.0.transformer.",
              ("text_encoder_2", "sdxl"): "conditioner.embedders.1.model."}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
            "mlp.fc2": "mlp.c_proj"}


def detect_family(keys):
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    return "sd2" if any(k.startswith("cond_stage_model.model.") for k in keys) else "sd15"


def _unet_ldm(key, cfg):
    """diffusers UNet key -> original name (without prefix)."""
    n = len(cfg.block_out_channels)
    layers = per_block(cfg.layers_per_block, n)
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module, param = key.rsplit(".", 1)
    if module in fixed:
        return f"{fixed[module]}.{param}"
    p = key.split(".")
    kind = p[2] if p[0] != "mid_block" else p[1]

    def rest(q):  # inside a resnet the names differ; inside a transformer they are the same
        return ".".join([RESNET.get(q[0], q[0])] + q[1:]) if kind == "resnets" else ".".join(q)

    if p[0] == "mid_block":  # resnet, transformer, resnet
        return f"middle_block.{1 if kind == 'attentions' else 2 * int(p[2])}." + rest(p[3:])
    i = int(p[1])
    if p[0] == "down_blocks":
        first = 1 + sum(layers[b] + 1 for b in range(i))
        if kind == "downsamplers":
            return f"input_blocks.{first + layers[i]}.0.op." + ".".join(p[5:])
        return f"input_blocks.{first + int(p[3])}.{1 if kind == 'attentions' else 0}." + rest(p[4:])
    up = [layers[::-1][b] + 1 for b in range(n)]
    first = sum(up[:i])
    if kind == "upsamplers":
        has_attn = cfg.up_block_types[i].startswith("CrossAttn")
        return f"output_blocks.{first + up[i] - 1}.{2 if has_attn else 1}.conv." + ".".join(p[5:])
    return f"output_blocks.{first + int(p[3])}.{1 if kind == 'attentions' else 0}." + rest(p[4:])


def _vae_ldm(key, cfg):
    """diffusers VAE key -> original name; also says whether the tensor is a 1x1 conv there (attention q/k/v/out)."""
    n = len(cfg.block_out_channels)
    k = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
    k = k.replace("mid_block.attentions.0", "mid.attn_1")
    for a, b in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
        k = k.replace(f"attn_1.{a}.", f"attn_1.{b}.")
    p = k.split(".")
    if p[1] in ("down_blocks", "up_blocks"):
        i = int(p[2]) if p[1] == "down_blocks" else n - 1 - int(p[2])
        what = {"resnets": f"block.{p[4]}", "downsamplers": "downsample", "upsamplers": "upsample"}[p[3]]
        k = ".".join([p[0], "down" if p[1] == "down_blocks" else "up", str(i), what] + p[5:])
    return k, ".attn_1." in k and k.endswith("weight") and not k.endswith("norm.weight")


def _openclip_ldm(key):
    """transformers CLIP text key -> OpenCLIP name, and how to cut it out of the stored tensor."""
    k = key.removeprefix("text_model.")
    simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    if k in simple:
        return simple[k], None
    if k == "text_projection.weight":
        return "text_projection", "T"
    p = k.split(".")  # encoder.layers.i.<module>.<param>
    module, param = ".".join(p[3:-1]), p[-1]
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"transformer.resblocks.{p[2]}.attn.in_proj_{param}", "qkv".index(module[10])
    return f"transformer.resblocks.{p[2]}.{OPENCLIP[module]}.{param}", None


def ldm_key(component, key, family, unet_cfg, vae_cfg):
    """Our key of `component` -> (the original checkpoint's key, how to transform the stored tensor):
    None (as is), "conv" (a 1x1 conv weight -> linear), "T" (transposed), or 0/1/2 (q/k/v third of a fused tensor)."""
    if component == "unet":
        return LDM_PREFIX["unet"] + _unet_ldm(key, unet_cfg), None
    if component == "vae":
        k, conv = _vae_ldm(key, vae_cfg)
        return LDM_PREFIX["vae"] + k, "conv" if conv else None
    prefix = LDM_PREFIX[(component, family)]
    if prefix.endswith(".model."):
        k, how = _openclip_ldm(key)
        return prefix + k, how
    return prefix + key, None


def convert_ldm_checkpoint(sd, models, family, unet_cfg, vae_cfg, name="checkpoint"):
    """{component: module (meta)} -> {component: state dict in our names} read from an original-format state dict.
    unet_cfg / vae_cfg: UNetConfig / VAEConfig (the layout of input_blocks / output_blocks depends on them)."""
    out = {}
    for comp, model in models.items():
        out[comp] = {}
        for key in model.state_dict():
            src, how = ldm_key(comp, key, family, unet_cfg, vae_cfg)
            if src not in sd:
                raise LoadError(f"{name}: key {src} not found (needed for {comp}.{key}); is this a {family} "
                                f"checkpoint?")
            t = sd[src]
            if how == "conv":
                t = t.reshape(t.shape[:2])
            elif how == "T":
                t = t.t().contiguous()
            elif isinstance(how, int):
                t = t.chunk(3, dim=0)[how].contiguous()
            out[comp][key] = t
    return out


def convert_to_ldm(components, family, unet_cfg, vae_cfg):
    """The inverse, for tests: {component: our state dict} -> one original-format state dict."""
    sd = {}
    for comp, tensors in components.items():
        for key, t in tensors.items():
            dst, how = ldm_key(comp, key, family, unet_cfg, vae_cfg)
            if how == "conv":
                t = t[:, :, None, None]
            elif how == "T":
                t = t.t()
            elif isinstance(how, int):  # q, k, v -> one fused tensor
                parts = sd.setdefault(dst, [None] * 3)
                parts[how] = t
                if all(x is not None for x in parts):
                    sd[dst] = torch.cat(parts)
                continue
            sd[dst] = t.contiguous()
    return sd


# ----------------------------------------------------------------------------------------------------------------
# OpenCLIP names (HPSv2's checkpoint) -> ours, by a few string rules; q, k, v are stored fused (in_proj)

OPENCLIP_RULES = [  # (OpenCLIP, ours), in order; prefixes match at the key's start, ".x." parts anywhere
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("visual.conv1.", "vision_model.embeddings.patch_embedding."),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.", "vision_model.pre_layrnorm."), ("visual.ln_post.", "vision_model.post_layernorm."),
    ("visual.proj", "visual_projection.weight"),
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("token_embedding.", "text_model.embeddings.token_embedding."),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.", "text_model.final_layer_norm."), ("text_projection", "text_projection.weight"),
    (".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."), (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."), (".attn.out_proj.", ".self_attn.out_proj."),
]
TRANSPOSED = ("visual.proj", "text_projection")  # OpenCLIP stores these as (in, out) matrices used as x @ proj


def openclip_to_ours(sd):
    """An OpenCLIP CLIP state dict -> CLIPModel names: the rules above, the two projections transposed, and
    attn.in_proj_{weight,bias} (3D, ...) split into self_attn.{q,k,v}_proj."""
    out = {}
    for k, v in sd.items():
        if k.startswith("module."):  # saved from DistributedDataParallel
            k = k[len("module."):]
        if k == "attn_mask":
            continue
        new = k
        for a, b in OPENCLIP_RULES:
            new = new.replace(a, b) if new.startswith(a) or a.startswith(".") else new
        if k in TRANSPOSED:
            v = v.t().contiguous()
        if ".attn.in_proj_" in new:
            stem, kind = new.split(".attn.in_proj_")
            for name, part in zip("qkv", v.chunk(3)):
                out[f"{stem}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            continue
        out[new] = v
    return out
