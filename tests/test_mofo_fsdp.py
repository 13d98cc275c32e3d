"""MoFO on FSDP2-sharded (DTensor) parameters equals single-process MoFO bit for bit: two gloo
processes on the CPU, each holding half of every tensor's rows, must find the same whole-tensor
mask as one process holding all of it. Seconds (most of them the two processes importing torch)."""
import io

import pytest
import torch
import torch.distributed as dist

import mofo
import mofo_fast
from mofo_fast import MoFO  # the fast path steps DTensors; mofo.MoFO refuses them

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def model(seed=0):
    # Odd sizes, so that the two ranks' rows differ in number: the first weight (301 x 257 =
    # 77357 entries) takes the sampled bracket; the last weight (1 x 3) and bias (1) leave rank 1
    # with no rows at all; the LayerNorm's vectors take the dense step.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(257, 301), torch.nn.LayerNorm(301), torch.nn.Tanh(),
                               torch.nn.Linear(301, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def loss_on_batch(net, step):  # the same full batch on every rank: the same gradients as one process
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 257, generator=gen), torch.randn(16, 1, generator=gen)
    return torch.nn.functional.mse_loss(net(x), y)


def check_global_threshold(rank, group):
    """global_threshold of a tensor split over the ranks in several ways (parts of any size, one
    of them empty) is the exact tau and count of the whole tensor, also when the bracket misses."""
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(100003, generator=gen).abs(), torch.randint(0, 5, (90000,), generator=gen).float(),
             torch.zeros(70000), torch.randn(37, generator=gen).abs()]
    default = mofo_fast.SAMPLE_Z
    try:
        for z in (default, 0.0):  # 0: a bracket of no width, which misses most of the time
            mofo_fast.SAMPLE_Z = z
            for x in cases:
                n = x.numel()
                for cut in (0, n // 3, n):  # rank 0 holds x[:cut], rank 1 the rest
                    part = x[:cut] if rank == 0 else x[cut:]
                    for k in sorted({1, n // 10, n // 2, n}):
                        tau, count = mofo_fast.global_threshold(part, k, group, n)
                        assert tau == torch.topk(x, k).values[-1] and count == int((x >= tau).sum()), (n, cut, k, z)
    finally:
        mofo_fast.SAMPLE_Z = default


def check_fsdp_equals_one_process(mesh, filter, alpha, steps=6):
    from torch.distributed.fsdp import fully_shard
    one, sharded = model(), model()
    for layer in sharded:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    assert all(len(p.placements) == mesh.ndim for p in sharded.parameters())  # HSDP: (Replicate(), Shard(0))
    kwargs = dict(lr=1e-2, weight_decay=0.01, alpha=alpha, filter=filter, seed=3)
    opt_one, opt = mofo.MoFO(one.parameters(), **kwargs), MoFO(sharded.parameters(), **kwargs)
    for step in range(steps):
        for net, o in ((one, opt_one), (sharded, opt)):
            o.zero_grad()
            loss_on_batch(net, step).backward()
        for p, q in zip(sharded.parameters(), one.parameters()):
            assert torch.equal(p.grad.full_tensor(), q.grad)  # so only the optimizers differ
        opt_one.step()
        opt.step()
        for (name, p), q in zip(sharded.named_parameters(), one.parameters()):
            assert torch.equal(p.full_tensor(), q), (filter, alpha, step, name)
        assert opt.last_update_fraction == opt_one.last_update_fraction  # the global count
        if step == steps // 2:  # a state_dict round trip in the middle: saved, loaded, lock-step on
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            opt = MoFO(sharded.parameters(), **{**kwargs, "seed": 99})
            opt.load_state_dict(torch.load(buffer, weights_only=False))
    with pytest.raises(ValueError, match="mofo_fast.MoFO"):  # the readable one: whole tensors only
        mofo.MoFO(sharded.parameters()).step()


def check_complex_fsdp_equals_one_process(mesh, steps=4):
    """A complex model, stepped as its real view (two entries per complex one, in the mask and
    the random draw too): each rank's rows of it, bit for bit those of one process."""
    def complex_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(257, 301, dtype=torch.complex64),
                                   torch.nn.Linear(301, 3, dtype=torch.complex64))
    from torch.distributed.fsdp import fully_shard
    for filter in ("momentum", "random"):
        one, sharded = complex_model(), complex_model()
        for layer in sharded:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        kwargs = dict(lr=1e-2, alpha=0.1, filter=filter)
        opt_one, opt = mofo.MoFO(one.parameters(), **kwargs), MoFO(sharded.parameters(), **kwargs)
        for step in range(steps):
            x = torch.randn(8, 257, dtype=torch.complex64, generator=torch.Generator().manual_seed(step))
            for net, o in ((one, opt_one), (sharded, opt)):
                o.zero_grad()
                net(x).abs().sum().backward()
            opt_one.step()
            opt.step()
            for p, q in zip(sharded.parameters(), one.parameters()):
                assert torch.equal(p.full_tensor(), q), (filter, step)
            assert opt.last_update_fraction == opt_one.last_update_fraction


def worker(rank, world, store):
    torch.set_num_threads(1)
    # rendezvous through a file, not a port picked free and released: another process (a Jupyter
    # kernel, a second test run) can take such a port before rank 0 binds it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        check_global_threshold(rank, mesh.get_group())
        for filter in mofo.FILTERS:
            for alpha in (0.1, 1.0):
                check_fsdp_equals_one_process(mesh, filter, alpha)
        # HSDP: a 2-D mesh, replicated along its first dim (of size 1 here), sharded along its second
        hsdp = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
        for filter in ("momentum", "random"):
            check_fsdp_equals_one_process(hsdp, filter, 0.1)
        check_complex_fsdp_equals_one_process(mesh)
    finally:
        dist.destroy_process_group()


def test_fsdp_mofo_equals_one_process_bitwise(tmp_path):
    torch.multiprocessing.spawn(worker, args=(2, tmp_path / "rendezvous"), nprocs=2)
