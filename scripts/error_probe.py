"""Argument errors raised by bn_ext's C++ checks, each in its own process, so that a crash (seen on
the GPU machine's torch 2.11 build) shows which messages and devices are affected. Prints one line
per probe: raised (and the message), or the signal that killed the process."""

import subprocess
import sys

PROBES = {
    "cpu shape message": "ops.batch_norm_stats(torch.randn(5))",
    "cpu size message": "x=torch.randn(4,3,5); m,v=ops.batch_norm_stats(x); "
    "ops.batch_norm_backward(torch.randn(4,3,6),x,None,m,v,1e-5,True,[True,True,True])",
    "cpu dtype message": "ops.batch_norm_train(torch.randn(4,3,5), torch.ones(3).double(), None, 1e-5)",
    "cpu eps message": "ops.batch_norm_train(torch.randn(4,3,5), None, None, float('nan'))",
    "cuda shape message": "ops.batch_norm_stats(torch.randn(5, device='cuda'))",
    "cuda device message": "ops.batch_norm_train(torch.randn(4,3,5,device='cuda'), None, torch.zeros(3), 1e-5)",
    "torch's own size error": "torch.randn(6).view(4)",
}
PRELUDE = "import torch, bn_ext; ops = torch.ops.bn_ext\n"


def main():
    for name, body in PROBES.items():
        if "cuda" in body and not _cuda():
            continue
        code = (
            PRELUDE
            + f"try:\n    {body}\nexcept Exception as e:\n    print(type(e).__name__, str(e).splitlines()[0][:140])\n"
        )
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True)
        out = r.stdout.strip() if r.returncode == 0 else f"DIED rc={r.returncode} {r.stderr.strip().splitlines()[:1]}"
        print(f"{name:24s} {out}")


def _cuda():
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
