#!/bin/bash
# Second seed for the three closest pilots (112 px).
. /work/main/.venv/bin/activate
cd /tmp/photo
run() { name=$1; shift; /usr/bin/time -f "$name wall %e s" reslab train --data ft5 --arch resnet18 --epochs 15 --batch-size 32 --schedule cosine --warmup 1 --weight-decay 1e-4 --eval-every 5 --image-size 112 --pretrained runs/pre64 --seed 1 --out runs/$name "$@" > logs/$name.log 2>&1; tail -1 logs/$name.log; grep "^epoch 15" logs/$name.log; }
run s1_head10 --lr 0.01 --head-lr-scale 10
run s1_head1 --lr 0.01
run s1_adamw --optimizer adamw --lr 0.001 --weight-decay 0.05 --head-lr-scale 10
