#!/bin/bash
# Transfer on the 2-core CPU: ft5 (5 classes never pretrained on, 500 training / 500 test images, 256-320 px).
# Same budget for every row: 15 epochs of batch 32 (225 steps). Whole commands, one at a time.
. /work/main/.venv/bin/activate
cd /tmp/photo
run() { name=$1; shift; /usr/bin/time -f "$name wall %e s" reslab train --data ft5 --arch resnet18 --epochs 15 --batch-size 32 --schedule cosine --warmup 1 --weight-decay 1e-4 --eval-every 5 --out runs/$name "$@" > logs/$name.log 2>&1; tail -1 logs/$name.log; grep "^epoch 15" logs/$name.log; }
mkdir -p logs
run scratch224 --lr 0.1
run probe224 --pretrained runs/pre64 --freeze --lr 0.1
run full224 --pretrained runs/pre64 --lr 0.01 --head-lr-scale 10
run full112 --pretrained runs/pre64 --lr 0.01 --head-lr-scale 10 --image-size 112
run scratch112 --lr 0.1 --image-size 112
run probe112 --pretrained runs/pre64 --freeze --lr 0.1 --image-size 112
run cifar32 --augment paper --image-size 32 --lr 0.1
