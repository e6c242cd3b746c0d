#!/bin/bash
. /work/main/.venv/bin/activate
cd /tmp/photo
/usr/bin/time -f "pretrain wall %e s" reslab train --arch resnet18 --data pre5 --augment paper --image-size 64 --epochs 6 --batch-size 128 --lr 0.1 --schedule cosine --warmup 1 --weight-decay 5e-4 --out runs/pre64 --log-every 50
