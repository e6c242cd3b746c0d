"""Issue 22: where a bf16 training step spends its time on the CPU. Profiles a few steps of ARCH (default conv8m)
at batch 256 in bf16 autocast, channels-last, with torch.profiler, and prints the operators by self CPU time.
Usage: python experiments/issue22/profile_step.py [ARCH] [THREADS] [PRECISION]"""

import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from reslab.core.execution import autocast
from reslab.models import create_model
from reslab.training.optim import SGD

arch = sys.argv[1] if len(sys.argv) > 1 else "conv8m"
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
precision = sys.argv[3] if len(sys.argv) > 3 else "bf16"
model = create_model(arch).to(memory_format=torch.channels_last).train()
opt = SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9, nesterov=True)
x = torch.randn(256, 3, 32, 32).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (256,))
dev = torch.device("cpu")


def step():
    with autocast(dev, precision):
        loss = F.cross_entropy(model(x), y, label_smoothing=0.2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


for _ in range(3):
    step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(5):
        step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))
