#!/bin/bash
# Pilots for the finetune preset, at 112 px to save time (full112 above is the reference: 66.8 %).
. /work/main/.venv/bin/activate
cd /tmp/photo
run() { name=$1; shift; /usr/bin/time -f "$name wall %e s" reslab train --data ft5 --arch resnet18 --epochs 15 --batch-size 32 --schedule cosine --warmup 1 --weight-decay 1e-4 --eval-every 5 --image-size 112 --pretrained runs/pre64 --out runs/$name "$@" > logs/$name.log 2>&1; tail -1 logs/$name.log; grep "^epoch 15" logs/$name.log; }
run p_ls --lr 0.01 --head-lr-scale 10 --label-smoothing 0.1
run p_ema --lr 0.01 --head-lr-scale 10 --ema 0.99
run p_lr03 --lr 0.03 --head-lr-scale 10
run p_head1 --lr 0.01
run p_adamw --optimizer adamw --lr 0.001 --weight-decay 0.05 --head-lr-scale 10
