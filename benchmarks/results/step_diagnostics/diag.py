"""Diagnostic wrapper (not project code): run the LM recipe with StepAdamW instrumented.
env STEPDIAG_FROZEN_EPS: 'eps' -> frozen_eps = group eps (HEAD behaviour); unset -> patch default (None)."""
import atexit
import json
import os
import runpy
import sys

import torch

import nm_hf.optim as O

print("nm_hf.optim from", O.__file__, flush=True)
S = O.StepAdamW
REC = {}
OUT = None
D = 128
SHAPES = {(D, 3 * D): "attn.c_attn", (D, D): "attn.c_proj", (D, 4 * D): "mlp.c_fc", (4 * D, D): "mlp.c_proj"}

def qk_norms(opt):
    q, k = [], []
    for g in opt.param_groups:
        for p in g["params"]:
            if tuple(p.shape) == (D, 3 * D):  # Conv1D weight (in, out): q | k | v columns
                q.append(p[:, :D].norm().item())
                k.append(p[:, D:2 * D].norm().item())
    return q, k

orig_init = S.__init__
def init(self, *a, **kw):
    fe = os.environ.get("STEPDIAG_FROZEN_EPS")
    if fe == "eps":
        kw["frozen_eps"] = kw.get("eps", 1e-8)
    elif fe:
        kw["frozen_eps"] = float(fe)
    orig_init(self, *a, **kw)
    REC["frozen_eps_arg"] = self.frozen_eps
    REC["eps"] = self.param_groups[0]["eps"]
    REC["betas"] = self.param_groups[0]["betas"]
    REC["qk_init"] = qk_norms(self)
    atexit.register(lambda: dump(self))
S.__init__ = init

orig_switch = S._switch
def switch(self):
    orig_switch(self)
    masked = self.masked_ids
    qs = {}
    for g in self.param_groups:
        b2 = g["betas"][1]
        for p in g["params"]:
            name = SHAPES.get(tuple(p.shape))
            st = self.state.get(p)
            if name is None or not st:
                continue
            key = name + (" (masked)" if id(p) in masked else " (dense AdamW)")
            qs.setdefault(key, []).append((st["exp_avg_sq"] / (1 - b2 ** st["step"])).sqrt().flatten())
    REC["switch_step"] = self.switch_step
    REC["sqrt_vhat_at_switch"] = {k: {"q01": torch.quantile(torch.cat(v).float(), 0.01).item(),
                                      "q50": torch.quantile(torch.cat(v).float(), 0.5).item()} for k, v in qs.items()}
    REC["qk_at_switch"] = qk_norms(self)
    print("STEPDIAG switch", json.dumps(REC), flush=True)
S._switch = switch

orig_step = S.step
def step(self, closure=None):
    r = orig_step(self, closure)
    if self.steps % 100 == 0:
        q, k = qk_norms(self)
        REC.setdefault("qk_max_by_step", {})[self.steps] = max(q + k)
    return r
S.step = step

def dump(opt):
    REC["switch_step"] = opt.switch_step
    REC["qk_end"] = qk_norms(opt)
    REC["qk_max_end"] = max(REC["qk_end"][0] + REC["qk_end"][1])
    out = [a for a in sys.argv if a.startswith("/tmp/stepdiag/")]
    path = os.path.join(out[0] if out else "/tmp/stepdiag", "stepdiag.json")
    with open(path, "w") as f:
        json.dump(REC, f, indent=1)
    print("STEPDIAG end", json.dumps(REC), flush=True)

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
