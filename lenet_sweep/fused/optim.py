"""SGD and Adam over stacked (K, ...) weights, each member with its own lr: torch.optim's update
rules written out for a group, with every per-member number in a (K,) tensor so that a CUDA graph
captures the step once for any lr. A member follows torch.optim on its own weights within the
tolerances tests/test_fused_optim.py names (a tensor lr divides where torch.optim multiplies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lenet_sweep.errors import UserError

Optimizer = torch.optim.Optimizer

SUPPORTED = "torch.optim.SGD (dampening 0) or torch.optim.Adam/AdamW (amsgrad off)"


@dataclass
class FusedOptimizer:
    kind: str  # "sgd" | "adam"
    hyper: dict  # shared: momentum, nesterov, weight_decay, betas, eps, decoupled
    lr: torch.Tensor  # (K,)
    step_count: torch.Tensor  # (K,) Adam's step, float as torch keeps it
    state: dict[str, dict[str, torch.Tensor]]  # param name -> {buffer name: (K, ...)}

    @classmethod
    def stack(cls, optimizers: list[Optimizer], params: dict) -> FusedOptimizer:
        kind, hyper = _kind_and_hyper(optimizers[0])
        for opt in optimizers[1:]:
            _check_same(opt, kind, hyper)
        device = next(iter(params.values())).device
        lr = torch.tensor([o.param_groups[0]["lr"] for o in optimizers], device=device)
        names = list(params)
        if kind == "adam":
            buffers = ["exp_avg", "exp_avg_sq"]
        else:
            buffers = ["momentum_buffer"] if hyper["momentum"] else []
        state = {name: {} for name in names}
        steps = []
        for opt in optimizers:
            per_param = [opt.state.get(p, {}) for p in opt.param_groups[0]["params"]]
            steps.append(float(per_param[0].get("step", 0.0)))
            for name, s, p in zip(names, per_param, opt.param_groups[0]["params"], strict=True):
                for b in buffers:
                    got = s.get(b)
                    state[name].setdefault(b, []).append(
                        got.detach() if got is not None else torch.zeros_like(p)
                    )
        state = {n: {b: torch.stack(v).to(device) for b, v in s.items()} for n, s in state.items()}
        return cls(kind, hyper, lr, torch.tensor(steps, device=device), state)

    def tensors(self) -> list[torch.Tensor]:
        return [self.step_count, *(t for s in self.state.values() for t in s.values())]

    def select(self, index: torch.Tensor) -> FusedOptimizer:
        state = {
            n: {b: t.index_select(0, index) for b, t in s.items()} for n, s in self.state.items()
        }
        return FusedOptimizer(
            self.kind,
            self.hyper,
            self.lr.index_select(0, index),
            self.step_count.index_select(0, index),
            state,
        )

    def unstack(self, k: int, optimizer: Optimizer) -> None:
        """Member k's optimizer state into its own optimizer (what checkpoints save)."""
        for name, p in zip(self.state, optimizer.param_groups[0]["params"], strict=True):
            s = {b: t[k].clone() for b, t in self.state[name].items()}
            if self.kind == "adam":
                s["step"] = self.step_count[k].detach().cpu().clone()
            if s:
                optimizer.state[p] = s

    @torch.no_grad()
    def write(self, k: int, optimizer: Optimizer) -> None:
        """Another trial's optimizer into slot k, in place: its lr, step and buffers (zero
        where it has none yet, as `stack` starts them)."""
        _check_same(optimizer, self.kind, self.hyper)
        self.lr[k] = optimizer.param_groups[0]["lr"]
        per_param = [optimizer.state.get(p, {}) for p in optimizer.param_groups[0]["params"]]
        self.step_count[k] = float(per_param[0].get("step", 0.0))
        for buffers, s in zip(self.state.values(), per_param, strict=True):
            for b, t in buffers.items():
                t[k].copy_(s[b]) if b in s else t[k].zero_()

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        h = self.hyper
        if self.kind == "adam":
            self.step_count += 1
        for name, p in params.items():
            g, s = grads[name], self.state[name]
            lr = self.lr.view(-1, *[1] * (p.dim() - 1))
            if h["weight_decay"] and not h.get("decoupled"):
                g = g.add(p, alpha=h["weight_decay"])
            if self.kind == "sgd":
                if h["momentum"]:
                    s["momentum_buffer"].mul_(h["momentum"]).add_(g)
                    g = (
                        g.add(s["momentum_buffer"], alpha=h["momentum"])
                        if h["nesterov"]
                        else s["momentum_buffer"]
                    )
                p.sub_(lr * g)
                continue
            if h.get("decoupled") and h["weight_decay"]:
                p.mul_(1 - lr * h["weight_decay"])
            beta1, beta2 = h["betas"]
            step = self.step_count.view_as(lr)
            s["exp_avg"].lerp_(g, 1 - beta1)
            s["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step_size = lr / (1 - beta1**step)
            denom = (s["exp_avg_sq"].sqrt() / (1 - beta2**step).sqrt()).add_(h["eps"])
            p.sub_(step_size * s["exp_avg"] / denom)


def _check_same(opt: Optimizer, kind: str, hyper: dict) -> None:
    if _kind_and_hyper(opt) != (kind, hyper):
        raise UserError(
            "fused trials must share the optimizer and its settings but lr; "
            "group them by optimizer or use hydra/launcher=basic"
        )


def _kind_and_hyper(opt: Optimizer) -> tuple[str, dict]:
    group = opt.param_groups[0]
    if len(opt.param_groups) != 1 or group.get("maximize"):
        raise UserError(f"fused training supports {SUPPORTED} with one param group")
    if isinstance(opt, torch.optim.SGD) and not group["dampening"]:
        return "sgd", {
            "momentum": group["momentum"],
            "nesterov": group["nesterov"],
            "weight_decay": group["weight_decay"],
        }
    if isinstance(opt, torch.optim.Adam) and not group["amsgrad"]:
        decoupled = isinstance(opt, torch.optim.AdamW) or group.get("decoupled_weight_decay")
        return "adam", {
            "betas": tuple(group["betas"]),
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "decoupled": bool(decoupled),
        }
    raise UserError(
        f"optimizer {type(opt).__name__}: fused training supports {SUPPORTED}; "
        "use hydra/launcher=basic for others"
    )
