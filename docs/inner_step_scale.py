"""
The inner step's scale, measured on checkpoints: docs/ablation.md's "Why the step is so small" reads its table.

    python docs/inner_step_scale.py runs/x/splice/metamae_s0/ckpt.pt runs/x/hapt_sample/metamae_s0/ckpt.pt ...

For each checkpoint, on 256 of its run's held-out inputs (the probe's validation rows, eval mode, masks from seed
0), it takes the inner step apart. With S_b the support tokens of sample b (n_s of them), l_bt token t's
reconstruction loss and g_bt = d l_bt / d Z_b the gradient it sends back to the latent through the decoder, the
step is  Z*_b - Z_b = -inner_lr * (B / S) * sum_t g_bt  (B * the batch's mean loss: S = sum_b n_s), so

    shift_b = ||Z*_b - Z_b|| / ||Z_b|| = inner_lr * (B / S) * rho_b * sqrt(sum_t ||g_bt||^2) / ||Z_b||
            ~ inner_lr * rho * g / (sqrt(n_s) * gamma * sqrt((1 + n) * D))

where n is the visible tokens, D the width, gamma the RMS of the final LayerNorm's weight (Z is LayerNorm'd, so
||Z_b|| ~ gamma * sqrt((1 + n) * D)), g the RMS of ||g_bt|| over the support tokens and rho = ||sum_t g_bt|| /
sqrt(sum_t ||g_bt||^2) (1 when the tokens' gradients are orthogonal). g itself is the loss's gradient at the
prediction (MSE: 2 sqrt(l / P) for P values a token; cross-entropy: ||softmax - onehot||) times the decoder's gain.
It prints one row per checkpoint: each factor, the shift this formula predicts, the shift measured, and the
inner_lr that would move Z by 1% (shift is linear in inner_lr at fixed weights). Then what the step does to the
query loss: the cosine between its direction and the query loss's gradient, the share of the query loss it removes
to first order (inner_lr * <grad_Z L_query, grad_Z (B L_support)> / L_query), and as measured ('gap').
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402
import data  # noqa: E402
import probe  # noqa: E402
import train  # noqa: E402
from metamae import MetaMAE, recon_loss  # noqa: E402


def per_token_gradients(model, task, z):
    """g (B, N, 1+n, D): the gradient each token's loss sends to its sample's latent (0 outside the support), and
    the per-token loss gradient at the prediction, ||d l_bt / d pred_bt|| (B, N)."""
    z = z.detach().requires_grad_()
    pred = model.decode(z, task.ids_restore)  # (B, N, P) or (B, N, vocab)
    if task.target.dtype == torch.long:
        per_token = F.cross_entropy(pred.flatten(0, 1), task.target.flatten(), reduction="none").view(task.mask.shape)
        at_pred = (pred.softmax(-1) - F.one_hot(task.target, pred.shape[-1])).norm(dim=-1)
    else:
        per_token = (pred - task.target).pow(2).mean(dim=-1)  # (B, N)
        at_pred = 2 * (pred - task.target).norm(dim=-1) / pred.shape[-1]
    grads = []
    for t in range(per_token.shape[1]):  # samples do not mix in the decoder: one backward gives every b's g_bt
        g, = torch.autograd.grad((per_token[:, t] * task.support[:, t]).sum(), z, retain_graph=True)
        grads.append(g)
    return torch.stack(grads, dim=1), at_pred.detach()


def measure(path):
    state, mcfg = cli.load_checkpoint(Path(path))
    cfg = train.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})
    model = MetaMAE(mcfg)
    cli.load_weights(model, state, Path(path))
    model.eval()
    lr = model.log_inner_lr.exp()[0].item() if mcfg.learn_inner_lr else mcfg.inner_lr  # a learned one: where it ended
    domain = data.DOMAINS[cfg.domain]
    d = probe.load_data(cfg, domain, torch.device("cpu"))
    x = domain.to_input(d.splits.train_x[d.val_idx][:256])
    torch.manual_seed(0)
    task = model.make_task(x)
    with torch.no_grad():
        z = model.encoder(task.target, task.ids_keep)  # (B, 1+n, D)
    g, at_pred = per_token_gradients(model, task, z)  # (B, N, 1+n, D), (B, N)
    s = task.support  # (B, N)
    n_s = s.sum(1)  # (B,)
    total = g.sum(1).flatten(1)  # (B, (1+n) D): sum_t g_bt
    sq = g.flatten(2).pow(2).sum(-1)  # (B, N): ||g_bt||^2, 0 outside the support
    rho = total.norm(dim=1) / sq.sum(1).sqrt()  # (B,)
    g_rms = (sq.sum(1) / n_s).sqrt()  # (B,)
    step = len(x) / s.sum() * total.norm(dim=1)  # (B,): ||Z* - Z|| / inner_lr
    shift = (lr * step / z.flatten(1).norm(dim=1)).mean()  # measured, as forward's 'shift'
    n, D = mcfg.num_visible, mcfg.embed_dim
    gamma = model.encoder.norm.weight.pow(2).mean().sqrt()
    predicted = (lr * rho * g_rms / (n_s.sqrt() * gamma * ((1 + n) * D) ** 0.5)).mean()
    support_loss = recon_loss(model.decode(z, task.ids_restore), task.target, s).item()
    # what the step does to the query loss: to first order, -inner_lr * <grad_Z L_query, grad_Z (B L_support)>
    zq = z.detach().requires_grad_()
    query = recon_loss(model.decode(zq, task.ids_restore), task.target, task.mask)
    grad_q, = torch.autograd.grad(query, zq)  # (B, 1+n, D)
    grad_s = (len(x) / s.sum() * g.sum(1))  # (B, 1+n, D): grad_Z (B L_support)
    cos = F.cosine_similarity(grad_q.flatten(), grad_s.flatten(), dim=0)
    with torch.no_grad():
        adapted = recon_loss(model.decode(z - lr * grad_s, task.ids_restore), task.target, task.mask)
    at = (at_pred.pow(2) * s).sum().div(s.sum()).sqrt()  # RMS loss gradient at the prediction, support tokens
    return dict(run=f"{cfg.domain} D{D} m{mcfg.mask_ratio}", inner_lr=lr, n=n, n_s=n_s.mean().item(), D=D,
                z_norm=(z.flatten(1).norm(dim=1) / ((1 + n) * D) ** 0.5).mean().item(), gamma=gamma.item(),
                support_loss=support_loss, at_pred=at.item(), gain=(g_rms.mean() / at).item(),
                g=g_rms.mean().item(), rho=rho.mean().item(), predicted=predicted.item(), shift=shift.item(),
                lr_for_1pct=(lr * 0.01 / shift).item(), cos_query=cos.item(),
                gap_first_order=(lr * (grad_q * grad_s).sum() / query).item(),
                gap=((query - adapted) / query).item())


if __name__ == "__main__":
    rows = [measure(p) for p in sys.argv[1:]]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
