#!/bin/bash
# The photo extras on top of the finetune recipe's optimiser (AdamW 1e-3, wd 0.05, head 10x), 112 px, seed 0.
. /work/main/.venv/bin/activate
cd /tmp/photo
run() { name=$1; shift; /usr/bin/time -f "$name wall %e s" reslab train --data ft5 --arch resnet18 --epochs 15 --batch-size 32 --schedule cosine --warmup 1 --eval-every 5 --image-size 112 --pretrained runs/pre64 --optimizer adamw --lr 0.001 --weight-decay 0.05 --head-lr-scale 10 --out runs/$name "$@" > logs/$name.log 2>&1; tail -1 logs/$name.log; grep "^epoch 15" logs/$name.log; }
run x_trivial --auto-augment trivial
run x_mix --mixup 0.2 --cutmix 1.0
run x_erase --random-erasing 0.25
