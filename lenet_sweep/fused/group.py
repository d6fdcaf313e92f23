"""A fused group's stacked state: its members' weights, optimizer state and shuffle streams
along a leading K axis (one slot per member), and the moves between it and each member's own
net, optimizer and stream: stack, unstack, write a newcomer into a slot, compact."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from lenet_sweep.core.state import TRAIN_SUMS, eval_sums
from lenet_sweep.fused.optim import FusedOptimizer


@dataclass
class Group:
    """The stacked state of the members still riding in the group (all on one device)."""

    members: list  # trainer.Member each
    template: nn.Module  # structure only (meta device), for functional_call
    params: dict[str, torch.Tensor]
    optim: FusedOptimizer
    shuffles: list[torch.Generator]  # the group's own: a member's stream is the copy its hooks see
    perm: torch.Tensor  # (K, n): this epoch's order of each member
    # An epoch's sums by name (core.state: TRAIN_SUMS, eval_sums), a (K,) tensor each: made once
    # for the evaluated splits' names, so that a captured graph accumulates into the same ones.
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def sums_for(self, eval_names) -> dict[str, torch.Tensor]:
        if not self.sums:
            keys = [*TRAIN_SUMS, *eval_sums(eval_names)]
            k, device = len(self.members), self.perm.device
            self.sums = {key: torch.zeros(k, device=device) for key in keys}
        return self.sums

    @classmethod
    def stack(cls, members: list, n: int, device: torch.device) -> Group:
        names = [name for name, _ in members[0].net.named_parameters()]
        params = {
            name: torch.stack([dict(m.net.named_parameters())[name].detach() for m in members])
            .to(device)
            .contiguous()
            for name in names
        }
        template = copy.deepcopy(members[0].net).to("meta")
        optim = FusedOptimizer.stack([m.optimizer for m in members], params)
        shuffles = [_copy_generator(m.state.shuffle) for m in members]
        perm = torch.zeros(len(members), n, dtype=torch.long, device=device)  # valid for warm-up
        return cls(members, template, params, optim, shuffles, perm)

    def state_tensors(self) -> list[torch.Tensor]:
        return [*self.params.values(), *self.optim.tensors()]

    def unstack(self, k: int) -> None:
        """Member k's slice back into its own net, optimizer and shuffle stream: what its hooks
        see, and keep seeing while the next epoch trains on the group's tensors."""
        member = self.members[k]
        with torch.no_grad():
            for name, p in member.net.named_parameters():
                p.copy_(self.params[name][k])
        self.optim.unstack(k, member.optimizer)
        member.state.shuffle.set_state(self.shuffles[k].get_state())

    def write(self, k: int, member) -> None:
        """A new member into slot k, in place: a captured epoch replays it without a recapture."""
        theirs = dict(member.net.named_parameters())
        mine = [(name, p.shape[1:]) for name, p in self.params.items()]
        if [(name, p.shape) for name, p in theirs.items()] != mine:
            raise ValueError(f"{member.name}: another net than its group's")
        with torch.no_grad():
            for name, p in theirs.items():
                self.params[name][k].copy_(p)
        self.optim.write(k, member.optimizer)
        self.shuffles[k] = _copy_generator(member.state.shuffle)
        self.members[k] = member

    def compacted(self, keep: list[int]) -> Group:
        index = torch.tensor(keep, device=self.perm.device)
        params = {k: v.index_select(0, index).contiguous() for k, v in self.params.items()}
        return Group(
            [self.members[i] for i in keep],
            self.template,
            params,
            self.optim.select(index),
            [self.shuffles[i] for i in keep],
            self.perm.index_select(0, index).contiguous(),
        )


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    copied = torch.Generator(device=generator.device)
    copied.set_state(generator.get_state())
    return copied
