r"""Fine-tune ImageNet-pretrained ResNet weights (torchvision/timm, converted) on CIFAR-10.

What it is for: transfer learning from converted weights, end to end through the normal
trainer. It shows that a conversion trains (a broken one starts near chance and stays
there for a while), and measures what ImageNet pretraining buys on CIFAR-10 at the images'
native 32x32 (the 7x7/2 stem and the max-pool leave a 1x1 map after stage 4, far from
what the weights were trained on) versus upsampled to 224x224 (the weights' own scale,
about 49x the compute per image). Not a paper recipe: the papers train from scratch.

  python -m resnet_jax.convert resnet50-11ad3fa6.pth runs/tv_resnet50   # IMAGENET1K_V1 file
  python -m resnet_jax.main --config configs/finetune_cifar10.py:resnet50 \
      --workdir runs/ft_resnet50_32 --config.init_from=runs/tv_resnet50
  python -m resnet_jax.main --config configs/finetune_cifar10.py:resnet50,size=224 \
      --workdir runs/ft_resnet50_224 --config.init_from=runs/tv_resnet50

`ARG`: resnet18/34/50/101/152 (torchvision layout: stride on the bottleneck's 3x3),
optionally `,size=N` (resize the 32x32 images bilinearly to NxN inside the model, on the
device) and `,bn=frozen` (BN keeps the ImageNet running statistics; scale and bias train).
The 1000-way ImageNet classifier is replaced by a freshly initialised 10-way one (the log
says so). Recipe: SGD momentum 0.9, lr 0.01 at batch 128 (a tenth of training from
scratch, so the pretrained features are not washed out in the first steps), cosine decay
over 5 epochs (1,950 steps), weight decay 1e-4 on kernels only, 4-px pad + crop + flip, and
per-channel standardisation (`channel_std`, the nearest CIFAR analogue of the ImageNet
mean/std the weights expect).
"""

import ml_collections

from resnet_jax.configs import cifar10
from resnet_jax.errors import UsageError


def get_config(arg: str = "resnet50") -> ml_collections.ConfigDict:
    name, _, rest = arg.partition(",")
    kwargs = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    unknown = sorted(set(kwargs) - {"size", "bn"})
    if unknown or kwargs.get("bn", "frozen") != "frozen":
        raise UsageError(f"finetune_cifar10.py:{arg}: allowed options are size=N and bn=frozen")
    c = cifar10.base()
    c.model.name = name
    c.model.stride_on_3x3 = True  # torchvision's and timm's layout ("ResNet v1.5")
    c.model.shortcut = "B"
    c.model.num_classes = 10
    c.model.bn_frozen = kwargs.get("bn") == "frozen"
    if "size" in kwargs:
        c.model.input_size = int(kwargs["size"])
    c.init_from = None  # set with --config.init_from=DIR_OR_PTH
    c.dataset.normalization = "channel_std"
    c.optimizer.learning_rate = 0.01
    c.optimizer.weight_decay_on = "kernels"
    c.schedule.kind = "cosine"
    c.schedule.total_steps = 1950  # 5 epochs of 50k at batch 128
    c.schedule.boundaries = ()
    c.steps_per_dispatch = 10
    c.log_every_steps = 50
    c.eval_every_steps = 390
    c.checkpoint_every_steps = 390
    return c
