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

Variants, as flags: --rpo-shared-noise (one t, eps per global batch), --rpo-diagonal 0.8 (the LLM code's
RPO-Diagonal), --rpo-rescale (beta / w_ii). Measured on both toy worlds, 3 seeds (docs/RPO.md): none beats the plain
loss on both, and tau 0.1 / 0.5 / 1.0 changes nothing there (the tiny text encoder's captions are nearly parallel),
so the defaults are the LLM code's (tau 0.5, a draw per pair). DPO wins on shapes, RPO beats DPO on style.
"""
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import diffdpo
import eval
from diffdpo import flag
from files import UserError

# ----------------------------------------------------------------------------------------------------------------
# The RPO objective


def rpo_logits(err_w, err_l, ref_err_w, ref_err_l):
    """The B x B matrix of step-wise DPO logits, winner i against loser j (the ELBO surrogate of diffdpo.py, Eq. 14
    of Diffusion-DPO, applied per denoising step as the Diffusion-RPO summary says):
        logit_ij = -0.5 ((err_w_i - ref_err_w_i) - (err_l_j - ref_err_l_j))
    The diagonal is Diffusion-DPO's `inside / beta`. Off the diagonal winner and loser had different prompts and
    different noise; each term still compares the policy's improvement on one image with that on another."""
    return -0.5 * ((err_w - ref_err_w)[:, None] - (err_l - ref_err_l)[None, :])                # (B, B)


def rpo_weights(emb_w, emb_l, tau):
    """w_ij = softmax_j(cos(e_w_i, e_l_j) / tau): for each winner, a distribution over the batch's losers that puts
    most mass on the most related pair (its own, for text embeddings). tau: the LLM RPO paper uses 0.5; the
    Diffusion-RPO ablation varies it. Embeddings carry no gradient."""
    sim = F.normalize(emb_w.float(), dim=-1) @ F.normalize(emb_l.float(), dim=-1).T     # (B, B) cosines
    return torch.softmax(sim / tau, dim=-1)


def rpo_loss(err_w, err_l, ref_err_w, ref_err_l, emb_w, emb_l, beta, tau, diagonal=0.0, rescale=False):
    """Diffusion-RPO loss and implicit accuracy (of the matched pairs, comparable with DPO's):
        loss = mean_ij -log sigmoid(beta * w_ij * logit_ij)
    As the LLM method's released code: the weight multiplies the logit inside the sigmoid and all B^2 terms are
    averaged. rescale: beta / w_ii for row i, so each matched pair gets DPO's beta (and, for text, the others less);
    diagonal > 0: rpo_diagonal_loss instead. With one pair w_11 = 1 and every variant is exactly diffdpo.dpo_loss."""
    logits = rpo_logits(err_w, err_l, ref_err_w, ref_err_l)
    acc = (logits.diagonal() > 0).float().mean()
    if diagonal:
        return rpo_diagonal_loss(logits, beta, diagonal), acc
    w = rpo_weights(emb_w, emb_l, tau).detach()
    if rescale:
        w = w / w.diagonal()[:, None]
    return -F.logsigmoid(beta * w * logits).mean(), acc


def rpo_diagonal_loss(logits, beta, d):
    """The LLM code's RPO-Diagonal (RPODiagonalTrainer, diagonal_weight 0.8 there): no similarity weights,
        loss = d mean_i l_ii + (1 - d) mean_{i != j} l_ij,      l_ij = -log sigmoid(beta logit_ij)
    With one pair there is no off-diagonal term and the loss is DPO's (the LLM code would give NaN)."""
    terms = -F.logsigmoid(beta * logits)                                              # (B, B)
    off = ~torch.eye(len(terms), dtype=torch.bool, device=terms.device)
    return d * terms.diagonal().mean() + (1 - d) * (terms[off].mean() if len(terms) > 1 else terms.diagonal().mean())


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
    image embeddings of a CLIP (scorer_nets.py's hand-written vision tower; `model` a transformers CLIPModel Hub id or
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
                                  "both", choices=("text", "image", "both"))
    rpo_clip: str = flag("openai/clip-vit-large-patch14", "the CLIP (transformers CLIPModel Hub id or folder) for "
                                                          "--rpo-embed image|both")
    rpo_shared_noise: bool = flag(False, "one (t, eps) for the whole global micro-batch, so every winner-loser term "
                                         "compares like with like (else one per pair, as DPO)")
    rpo_diagonal: float = flag(0.0, "the LLM code's RPO-Diagonal: this weight x the matched pairs' loss + the rest x "
                                    "the unweighted mean of the others (0.8 there; 0: off)")
    rpo_rescale: bool = flag(False, "beta / w_ii in row i: each matched pair gets DPO's beta")

    @property
    def method(self):
        return "rpo"

    def draw_noise(self, batch, latent_shape, num_timesteps):
        """--rpo-shared-noise: pair_noise of the global micro-batch's end (batch["position"], equal on every rank)
        repeated for its B pairs, so every rank draws the same and 2 processes equal 1; else one draw per pair."""
        if not self.rpo_shared_noise:
            return super().draw_noise(batch, latent_shape, num_timesteps)
        eps, t = diffdpo.pair_noise([batch["position"]], latent_shape, self.seed, num_timesteps,
                                    density=self.timestep_density)  # (1, C, h, w), (1,)
        return eps.repeat(len(batch["index"]), 1, 1, 1), t.repeat(len(batch["index"]))


def make_pair_loss(cfg):
    """diffdpo.train's pair_loss: the RPO loss over the global batch (each rank's errors and embeddings gathered)."""
    if not 0 <= cfg.rpo_diagonal <= 1:
        raise UserError(f"--rpo-diagonal {cfg.rpo_diagonal:g}: expected a weight in [0, 1]")
    if cfg.loss != "dpo":
        raise UserError(f"--loss {cfg.loss}: rpo.py trains the RPO loss; use diffdpo.py --loss {cfg.loss}")

    def pair_loss(err_w, err_l, ref_err_w, ref_err_l, batch, sd, world):
        emb_w, emb_l = (gather(e, world) for e in pair_embeddings(cfg.rpo_embed, sd, batch))
        return rpo_loss(*(gather(x, world) for x in (err_w, err_l, ref_err_w, ref_err_l)), emb_w, emb_l, cfg.beta,
                        cfg.tau, cfg.rpo_diagonal, cfg.rpo_rescale)
    variants = [f"tau {cfg.tau:g}, {cfg.rpo_embed}" if not cfg.rpo_diagonal else f"diagonal {cfg.rpo_diagonal:g}"]
    variants += ["rescaled"] * (cfg.rpo_rescale and not cfg.rpo_diagonal) + ["shared noise"] * cfg.rpo_shared_noise
    pair_loss.name = f"rpo ({', '.join(variants)})"
    return pair_loss


if __name__ == "__main__":
    cfg = RPOConfig.from_args(description=__doc__)
    try:
        loss = make_pair_loss(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    diffdpo.main(cfg, loss, image_embedder(cfg.rpo_clip) if cfg.rpo_embed != "text" else None)
