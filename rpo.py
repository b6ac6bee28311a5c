"""
Diffusion-RPO (Gu et al., 2024, "Diffusion-RPO: Aligning Diffusion Models through Relative Preference
Optimization"): Diffusion-DPO that also compares each preferred image with the rejected images of OTHER prompts in
the batch, weighting each comparison by how related the two prompts are.

    python rpo.py --model sd15 --data pickapic --out runs/rpo-sd15 --tau 0.5

The authors released no code for the diffusion method (their repository holds a README only). The loss below is,
term for term, the released code of the same group's LLM method (Yin et al., 2024, "Relative Preference
Optimization", yinyueqin/relative-preference-optimization, trainers.py, RPOTrainer: `logits * softmax(-cos_distance /
tau)` inside `logsigmoid`, each winner's row normalized, then the mean), with Diffusion-DPO's step-wise ELBO surrogate
as the logit; what the weights compare (text, image or both embeddings) is our choice, a flag. The training loop is
diffdpo.py's, reused as is.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import diffdpo
import eval
from diffdpo import flag

# ----------------------------------------------------------------------------------------------------------------
# The RPO objective


def rpo_logits(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l):
    """The B x B matrix of step-wise DPO logits, winner i against loser j (the ELBO surrogate of diffdpo.py, Eq. 14
    of Diffusion-DPO, applied per denoising step as the Diffusion-RPO summary says):
        logit_ij = -0.5 ((mse_w_i - ref_w_i) - (mse_l_j - ref_l_j))
    The diagonal is Diffusion-DPO's `inside / beta`. Off the diagonal winner and loser had different prompts and
    different noise; each term still compares the policy's improvement on one image with that on another."""
    return -0.5 * ((model_losses_w - ref_losses_w)[:, None] - (model_losses_l - ref_losses_l)[None, :])


def rpo_weights(emb_w, emb_l, tau):
    """w_ij = softmax_j(cos(e_w_i, e_l_j) / tau): for each winner, a distribution over the batch's losers that puts
    most mass on the most related pair (its own, for text embeddings). tau: the LLM RPO paper uses 0.5; the
    Diffusion-RPO ablation varies it. Embeddings carry no gradient."""
    sim = F.normalize(emb_w.float(), dim=-1) @ F.normalize(emb_l.float(), dim=-1).T     # (B, B) cosines
    return torch.softmax(sim / tau, dim=-1)


def rpo_loss(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l, emb_w, emb_l, beta, tau):
    """Diffusion-RPO loss and implicit accuracy (of the matched pairs, comparable with DPO's):
        loss = mean_ij -log sigmoid(beta * w_ij * logit_ij)
    As the LLM method's released code: the weight multiplies the logit inside the sigmoid and all B^2 terms are
    averaged. With one pair w_11 = 1 and this is exactly diffdpo.dpo_loss."""
    logits = rpo_logits(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l)
    w = rpo_weights(emb_w, emb_l, tau).detach()
    loss = -F.logsigmoid(beta * w * logits).mean()
    return loss, (logits.diagonal() > 0).float().mean()


# ----------------------------------------------------------------------------------------------------------------
# Embeddings of the pairs, and the batch across GPUs


def pair_embeddings(kind, sd, batch):
    """The embeddings the weights compare, L2-normalized, for winners (B, D) and losers (B, D):
        text   the prompts' (a pair's winner and loser share theirs)
        image  each image's own CLIP image embedding (computed once per pair in the data path, see image_embedder)
        both   [text, image] concatenated, so cos(e_i, e_j) = (cos_text + cos_image) / 2     (our choice)"""
    parts_w, parts_l = [], []
    if kind in ("text", "both"):
        t = F.normalize(text_embeddings(sd, batch["prompts"]), dim=-1)
        parts_w, parts_l = [t], [t]
    if kind in ("image", "both"):
        parts_w.append(F.normalize(batch["chosen_emb"].to(sd.device).float(), dim=-1))
        parts_l.append(F.normalize(batch["rejected_emb"].to(sd.device).float(), dim=-1))
    return torch.cat(parts_w, dim=-1), torch.cat(parts_l, dim=-1)


def image_embedder(model):
    """--rpo-embed image|both: `make(device)` -> embed([winner, loser] (3, R, R) in [-1, 1]) -> (2, D), the projected
    image embeddings of a CLIP (eval.py's hand-written vision tower; `model` a transformers CLIPModel Hub id or
    folder) of each training image as the UNet sees it (unflipped), preprocessed as CLIP's own processor does."""
    def make(device):
        clip = eval.load_scorer("clip", model, device=device)

        @torch.no_grad()
        def embed(pair):
            pixels = clip.preprocess([eval.to_pil(x) for x in pair]).to(device)
            return clip.clip.encode_image(pixels).float().cpu()
        embed.key = f"rpo-image:{model}"
        return embed
    return make


@torch.no_grad()
def text_embeddings(sd, prompts):
    """The loaded model's own text encoder, pooled at the EOS token (SDXL: OpenCLIP bigG's projected embedding;
    SD1.5: CLIP-L's final-normed EOS state). A pair's winner and loser share their prompt, so emb_w = emb_l."""
    enc, tok = sd.text_encoders[-1], sd.tokenizers[-1]
    return enc(tok(prompts).to(sd.device))[2].float()


class GatherLocalGrad(torch.autograd.Function):
    """all_gather whose backward keeps this rank's slice of the gradient, times the world size: every rank computes
    the same global loss, so the true gradient w.r.t. the local tensor is the SUM over ranks of their (identical)
    local slices = world x ours; DDP then averages over ranks. (Gloo has no reduce_scatter, which
    torch.distributed.nn.all_gather's backward needs.)"""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n] * ctx.world


def gather(x, world):
    return GatherLocalGrad.apply(x) if world > 1 else x


# ----------------------------------------------------------------------------------------------------------------
# CLI: diffdpo.py's trainer with this loss


@dataclass
class RPOConfig(diffdpo.TrainConfig):
    tau: float = flag(0.5, "temperature of the similarity weights")
    rpo_embed: str = flag("text", "what the weights compare: text (the model's own text encoder) | image (a CLIP's) | "
                                  "both")
    rpo_clip: str = flag("openai/clip-vit-large-patch14", "the CLIP (transformers CLIPModel Hub id or folder) for "
                                                          "--rpo-embed image|both")

    @property
    def method(self):
        return "rpo"


def make_pair_loss(cfg):
    if cfg.rpo_embed not in ("text", "image", "both"):
        raise SystemExit(f"error: --rpo-embed {cfg.rpo_embed}: expected text, image or both")

    def pair_loss(mw, ml, rw, rl, batch, sd, world):
        emb_w, emb_l = (gather(e, world) for e in pair_embeddings(cfg.rpo_embed, sd, batch))
        return rpo_loss(*(gather(x, world) for x in (mw, ml, rw, rl)), emb_w, emb_l, cfg.beta, cfg.tau)
    pair_loss.name = f"rpo (tau {cfg.tau:g}, {cfg.rpo_embed})"
    return pair_loss


if __name__ == "__main__":
    cfg = RPOConfig.from_args(description=__doc__)
    diffdpo.main(cfg, make_pair_loss(cfg), image_embedder(cfg.rpo_clip) if cfg.rpo_embed != "text" else None)
