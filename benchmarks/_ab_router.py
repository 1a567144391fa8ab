import torch, _ab_router_old as old
from omnimoe_kernels.router_topk import cartesian_topk_ids as new
from triton.testing import do_bench
for T, n, K in [(16384, 1024, 64), (4096, 320, 512), (4096, 320, 1024), (4096, 320, 2048), (4096, 320, 4096)]:
    r = torch.randn(T, n, device="cuda").log_softmax(-1); c = torch.randn(T, n, device="cuda").log_softmax(-1)
    so, io = old.cartesian_topk_ids(r, c, K); sn, i_n = new(r, c, K)
    eq = torch.equal(io, i_n) and torch.equal(so, sn)
    to = do_bench(lambda: old.cartesian_topk_ids(r, c, K), warmup=10, rep=50, return_mode="median")
    tn = do_bench(lambda: new(r, c, K), warmup=10, rep=50, return_mode="median")
    print(f"AB T={T} n={n} K={K} old {to:.3f} new {tn:.3f} equal {eq}", flush=True)
