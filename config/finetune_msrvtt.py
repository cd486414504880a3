# Fine-tune HMMC on MSR-VTT 9k and evaluate on 1k-A (the original README's run).
# $ torchrun --standalone --nproc_per_node=8 train.py config/finetune_msrvtt.py
# $ torchrun --standalone --nproc_per_node=8 train.py config/finetune_msrvtt.py --init_from=clip   # no pre-training
# Needs data/msrvtt (python prepare.py frames --videos=MSRVTT_VIDEOS --out=data/msrvtt/frames.lmdb and
# python prepare.py msrvtt ... --out=data/msrvtt) and the English pre-training checkpoint (config/pretrain_chvtt_en.py).
# Batch: 256 videos per step = 32 per GPU x 8 GPUs x 1 accumulation step. On one 80 GB GPU: --batch_size=256 fits
# with --activation_checkpointing=True, or --batch_size=128 --gradient_accumulation_steps=2 (same step size, but the
# contrastive batch is the micro-batch, so 128 is a different recipe).
# 180k captions / 256 = 703 steps per epoch, 5 epochs = 3,515 steps, 10% warm-up = 351.5 steps. About an hour on 8 GPUs.
out_dir = "out-finetune-msrvtt"
dataset = "msrvtt"
init_from = "out-pretrain-chvtt-en/ckpt_epoch3.pt"  # the original README's pytorch_model.bin.2: after epoch 3
num_frames = 12
image_size = 224
context_length = 32
eval_context_length = 32  # the benchmarks' caption length, whatever the training length
frame_sample = "random"
temporal_layers = 4
top_k_frames = 2  # the README's fine-tuning value
batch_size = 256
epochs = 5
learning_rate = 1e-4
text_lr = 1e-7  # the README's value: the CLIP text tower barely moves
clip_lr_scale = 1e-3  # CLIP vision tower at 1e-7
eval_batch_size = 256
num_workers = 8
log_interval = 50
eval_interval = 703  # once per epoch, as the original
