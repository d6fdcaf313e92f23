"""The optimizer a run steps with: torch.optim's SGD, Adam and AdamW, their update rules written
out, for the settings conf/optimizer offers.

Why: constructing or stepping any torch.optim optimizer imports torch._dynamo (its methods are
wrapped to break compiled graphs), 1.2-1.5 s of every run's start-up on 2 cores for a compiler
we never use. The configs still name torch.optim's classes; `build_optimizer` swaps in these
for the settings they cover, and builds torch's own for anything else (amsgrad, maximize, fused,
another optimizer), so no setting is lost. On the CPU the arithmetic is torch's single-tensor
path, op for op, so the numbers are bit-identical; state_dict has torch's format, so a checkpoint
loads into either. (lenet_sweep.fused_optim does the same for a fused group's stacked weights.)
"""

from __future__ import annotations

import functools

import torch

# Settings torch.optim takes that we only support at their defaults.
_FLAGS_SGD = {"maximize": False, "foreach": None, "differentiable": False, "fused": None}
_FLAGS_ADAM = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
               "differentiable": False, "fused": None}  # fmt: skip


class OneGroupOptimizer:
    """What the training loops, checkpoints and the fused group use of a torch.optim optimizer,
    for one param group: param_groups, state, zero_grad, step, state_dict, load_state_dict."""

    flags: dict = {}

    def __init__(self, params, defaults: dict):
        params = list(params)
        if not params or not all(isinstance(p, torch.Tensor) for p in params):
            raise TypeError(f"{type(self).__name__} takes an iterable of tensors (one group)")
        self.defaults = {**defaults, **self.flags}
        self.param_groups = [{"params": params, **self.defaults}]
        self.state: dict[torch.Tensor, dict] = {}

    @property
    def group(self) -> dict:
        return self.param_groups[0]

    def step(self, closure=None):
        """One update; `closure` (re-evaluates the loss) as torch.optim takes it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update()
        return loss

    def _update(self) -> None:
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.group["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
                continue
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()

    def state_dict(self) -> dict:
        params = self.group["params"]
        state = {i: dict(self.state[p]) for i, p in enumerate(params) if self.state.get(p)}
        hyper = {k: v for k, v in self.group.items() if k != "params"}
        return {"state": state, "param_groups": [{**hyper, "params": list(range(len(params)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's rules: the saved settings win; buffers move to their param's device and
        dtype, `step` stays as saved."""
        (saved,) = state_dict["param_groups"]
        params = self.group["params"]
        if len(saved["params"]) != len(params):
            raise ValueError("loaded state dict has a different number of parameters")
        self.group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for index, buffers in state_dict["state"].items():
            p = params[saved["params"].index(int(index))]
            self.state[p] = {k: v if k == "step" else _like(v, p) for k, v in buffers.items()}


def _like(value, param: torch.Tensor):
    if not isinstance(value, torch.Tensor):
        return value
    if param.is_floating_point():
        return value.to(dtype=param.dtype, device=param.device)
    return value.to(device=param.device)


class SGD(OneGroupOptimizer):
    """torch.optim.SGD with momentum, dampening, nesterov and weight decay."""

    flags = _FLAGS_SGD

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov})  # fmt: skip

    @torch.no_grad()
    def _update(self) -> None:
        g = self.group
        momentum, weight_decay = g["momentum"], g["weight_decay"]
        params, updates = [], []
        for p in g["params"]:
            if p.grad is None:
                continue
            d_p = p.grad
            if weight_decay != 0:
                d_p = d_p.add(p, alpha=weight_decay)
            if momentum != 0:
                state = self.state.setdefault(p, {})
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d_p.detach().clone()
                else:
                    buf.mul_(momentum).add_(d_p, alpha=1 - g["dampening"])
                d_p = d_p.add(buf, alpha=momentum) if g["nesterov"] else buf
            params.append(p)
            updates.append(d_p)
        if params:
            # One kernel for all params on CUDA (as torch's default foreach path); on the CPU a
            # loop of param.add_(d_p, alpha=-lr), torch's single-tensor path.
            torch._foreach_add_(params, updates, alpha=-g["lr"])


class Adam(OneGroupOptimizer):
    """torch.optim.Adam (decoupled_weight_decay=True: AdamW), amsgrad off."""

    flags = _FLAGS_ADAM

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 decoupled_weight_decay=False):  # fmt: skip
        betas = (float(betas[0]), float(betas[1]))
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay,
                                  "decoupled_weight_decay": decoupled_weight_decay})  # fmt: skip

    @torch.no_grad()
    def _update(self) -> None:
        g = self.group
        lr, (beta1, beta2), weight_decay = g["lr"], g["betas"], g["weight_decay"]
        for p in g["params"]:
            if p.grad is None:
                continue
            grad, state = p.grad, self.state.setdefault(p, {})
            if not state:  # torch keeps `step` as a float32 tensor on the CPU
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            if weight_decay != 0:
                if g["decoupled_weight_decay"]:
                    p.mul_(1 - lr * weight_decay)
                else:
                    grad = grad.add(p, alpha=weight_decay)
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = state["step"].item()
            step_size = lr / (1 - beta1**step)
            denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(g["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-step_size)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 0.01)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay=True)


# What a run's optimizer is: ours, or torch's own for settings ours does not cover.
Optimizer = torch.optim.Optimizer | OneGroupOptimizer
OURS = {torch.optim.SGD: SGD, torch.optim.Adam: Adam, torch.optim.AdamW: AdamW}


def build_optimizer(factory, params):
    """`factory`: the configured optimizer class with its settings (Hydra's `_partial_`). Ours
    where it covers those settings, else the class itself."""
    params = list(params)
    ours = OURS.get(getattr(factory, "func", None))
    if ours is not None and isinstance(factory, functools.partial) and not factory.args:
        settings = dict(factory.keywords)
        flags = {k: settings.pop(k) for k in list(settings) if k in ours.flags}
        plain = not any(isinstance(v, torch.Tensor) for v in settings.values())
        if plain and all(bool(v) == bool(ours.flags[k]) for k, v in flags.items()):
            try:
                return ours(params, **settings)
            except TypeError:  # a setting we do not take: torch's own takes it (or says why)
                pass
    return factory(params)
