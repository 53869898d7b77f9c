"""Sharing compress_model's per-layer work across the ranks of a process group.

Every rank runs the same compress_model call on the same model. Each layer gets
one owner rank, which computes its spectrum and factors; the owner broadcasts
what the other ranks need (the singular value energies for the rank choice,
then the factors), so every rank ends with the same compressed model after
doing only its share of the eigendecompositions.

Without a process group (or with one rank) every layer is owned locally and
the collectives are no-ops, so compress_model has one code path.
"""

import contextlib

import torch


class Workers:
    """This process's view of who factorizes which layer."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.world = 1
        self.rank = 0
        if dist.is_available() and dist.is_initialized():
            self.world = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
            if self.rank < 0:  # torch's answer outside the group
                raise ValueError("compress_model: this process is not a member of "
                                 "process_group; call compress_model on the group's members "
                                 "only")
        elif group is not None:
            raise ValueError("compress_model: process_group was given but torch.distributed "
                             "is not initialized")
        # NCCL only moves CUDA tensors; every other backend here takes CPU ones.
        self.device = torch.device("cpu")
        if self.world > 1 and "nccl" in str(dist.get_backend(group)).lower():
            self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def shared(self):
        return self.world > 1

    def assign(self, shapes):
        """{name: owner rank}: longest job first to the least loaded rank (deterministic)."""
        load = [0.0] * self.world
        owners = {}
        # An eigendecomposition of the min(d, k) side costs ~min(d, k)³, the
        # products around it ~d·k·min(d, k).
        cost = {n: d * k * min(d, k) + min(d, k) ** 3 for n, (d, k) in shapes.items()}
        # sorted() is stable: equal costs keep the layers' order on every rank.
        for name in sorted(shapes, key=lambda n: -cost[n]):
            owner = min(range(self.world), key=lambda r: (load[r], r))
            owners[name] = owner
            load[owner] += cost[name]
        return owners

    def check_same_call(self, signature, need=None, same=None):
        """Raise on every rank if the ranks were not given the same layers and targets.

        Without this, ranks disagreeing on the layers would wait forever in
        mismatched broadcasts. ``same(a, b)``, where given, compares two
        ranks' signatures (default: equality).
        """
        if not self.shared:
            return
        gathered = [None] * self.world
        self._dist.all_gather_object(gathered, signature, group=self.group)
        same = same or (lambda a, b: a == b)
        differing = [r for r, s in enumerate(gathered) if not same(s, gathered[0])]
        if differing and need is not None:
            raise RuntimeError(f"compress_model: ranks {differing} differ from rank 0: {need}")
        if differing:
            raise RuntimeError(
                f"compress_model: ranks {differing} were called with other layers, shapes or "
                "targets than rank 0; every rank must compress the same model the same way")

    def all_succeeded(self, error, what="the factorization"):
        """Agree across ranks whether a step failed; re-raise there and elsewhere say who failed."""
        if not self.shared:
            if error is not None:
                raise error
            return
        flags = torch.zeros(self.world, dtype=torch.int32, device=self.device)
        flags[self.rank] = 0 if error is None else 1
        self._dist.all_reduce(flags, group=self.group)
        if error is not None:
            raise error
        failed = [r for r, f in enumerate(flags.tolist()) if f]
        if failed:
            raise RuntimeError(f"compress_model: {what} failed on rank(s) {failed}; "
                               "see the error raised there")

    @contextlib.contextmanager
    def step(self, what):
        """A block of local work after which the ranks agree whether it failed,
        so that an error on one rank is raised on all of them instead of the
        others waiting forever in the next collective."""
        error = None
        try:
            yield
        except Exception as exc:  # re-raised below, on this rank and (as a notice) on the others
            error = exc
        self.all_succeeded(error, what)

    def sum_(self, tensor):
        """Sum ``tensor`` over the ranks, in place where it can be (calibration
        statistics of every rank); use the tensor returned."""
        if not self.shared:
            return tensor
        moved = tensor.to(self.device)
        self._dist.all_reduce(moved, group=self.group)
        if moved is not tensor:
            if tensor.is_inference() and not torch.is_inference_mode_enabled():
                # A sum made under inference_mode takes no in-place copy
                # outside it: the summed copy is returned instead.
                return moved.to(tensor.device)
            tensor.copy_(moved)
        return tensor

    def share(self, owner, tensor, shape, dtype=torch.float64):
        """``tensor`` from rank ``owner`` on every rank (on the CPU); others pass None."""
        if not self.shared:
            return tensor
        if self.rank == owner:
            buffer = tensor.to(device=self.device, dtype=dtype).contiguous()
        else:
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
        self._dist.broadcast(buffer, self._dist.get_global_rank(self.group, owner)
                             if self.group is not None else owner, group=self.group)
        return tensor if self.rank == owner else buffer.cpu()
