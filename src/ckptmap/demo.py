"""`ckptmap demo`: the everyday fine-tuning job, end to end, on a built-in example.

A DataParallel-wrapped 1000-class ResNet checkpoint (saved the way training
scripts save: nested under "model" beside the epoch) is looked at, planned,
applied with a reviewed rule file from rules/, and loaded into a 5-class model
whose backbone is frozen.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's resnet18 layout (conv1, bn1, layer1-4 of BasicBlocks, fc), narrow."""

    def __init__(self, num_classes: int = 1000, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        chans = [width, width * 2, width * 4, width * 8]
        cin = width
        for i, c in enumerate(chans, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, c, stride), BasicBlock(c, c)))
            cin = c
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def run(console, workdir: Path | None = None) -> None:
    """Run the demo, printing each step to a rich console."""
    import ckptmap
    from ckptmap.apply import write_plan
    from ckptmap.cli import print_inspect, print_plan
    from ckptmap.io import open_checkpoint
    from ckptmap.io.write import provenance
    from ckptmap.shipped import shipped_file

    with tempfile.TemporaryDirectory(prefix="ckptmap-demo-") as tmp:
        folder = Path(workdir or tmp)
        torch.manual_seed(0)
        pretrained = nn.DataParallel(ResNet(num_classes=1000))
        source = folder / "resnet-imagenet.pt"
        torch.save({"epoch": 90, "model": pretrained.state_dict()}, source)

        console.rule("1. The checkpoint: a DataParallel ResNet with a 1000-class head")
        console.print(f"$ ckptmap inspect {source.name}")
        print_inspect(console, open_checkpoint(source))

        rules_path = shipped_file("rules", "resnet-new-head.ckmap")
        console.rule(f"2. The rule file: rules/{rules_path.name}")
        console.print(rules_path.read_text(), markup=False, highlight=False)

        console.rule("3. The plan: a dry run from names and shapes, against the 5-class model")
        model = ResNet(num_classes=5)
        program = ckptmap.compile(rules_path)
        plan = program.plan(source, model)
        print_plan(console, plan)

        console.rule("4. Apply: write the mapped checkpoint (atomically, with provenance)")
        out = folder / "resnet-5class.safetensors"
        checkpoint = open_checkpoint(source)
        write_plan(
            plan,
            checkpoint,
            out,
            metadata=provenance(program.fingerprint, plan.fingerprint, [source]),
        )
        console.print(f"wrote {out.name}: {len(plan.mapping)} tensors")

        console.rule("5. Load into the 5-class model: validated, loaded, backbone frozen")
        report = ckptmap.load_into(model, out, 'init "fc"\nfreeze "**"\nunfreeze "fc"')
        console.print(str(report), markup=False, highlight=False)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        logits = model.eval()(torch.randn(2, 3, 64, 64))
        console.print(f"trainable parameters: {trainable}; logits shape {list(logits.shape)}")
