"""The core layer: errors, messages, file locks, progress, run directories, torchrun, execution (device, precision,
threads).
"""
