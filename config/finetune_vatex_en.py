# Fine-tune HMMC on VATEX with the English captions (25,991 train videos x 10 captions; 1,500 val / 1,500 test).
# $ torchrun --standalone --nproc_per_node=8 train.py config/finetune_vatex_en.py
# Needs data/vatex (python prepare.py frames --videos=VATEX_VIDEOS --out=data/vatex/frames.lmdb and
# python prepare.py vatex ... --out=data/vatex) and the English pre-training checkpoint, or --init_from=clip.
# The README gives no VATEX fine-tuning command; its recipe is the MSR-VTT one except for the learning rates. The
# original README's VATEX command (the test run) carries --text_lr 3e-5 --coef_lr 8e-1, which do nothing at test
# time and are almost certainly left over from VATEX fine-tuning: both CLIP towers trained (coef_lr scales the CLIP
# vision lr: 1e-4 x 0.8), unlike MSR-VTT's effectively frozen 1e-7. Batch: 256 videos per step = 32 per GPU x 8 x 1.
# 259,910 captions / 256 = 1,015 steps per epoch, 5 epochs = 5,075 steps, 10% warm-up.
out_dir = "out-finetune-vatex-en"
dataset = "vatex"
init_from = "out-pretrain-chvtt-en/ckpt.pt"
num_frames = 12
image_size = 224
context_length = 32
eval_context_length = 32  # the benchmarks' caption length, whatever the training length
frame_sample = "random"
temporal_layers = 4
batch_size = 256
epochs = 5
learning_rate = 1e-4
text_lr = 3e-5  # the original README's VATEX command
clip_lr_scale = 0.8  # its --coef_lr: CLIP vision tower at 8e-5
eval_batch_size = 256
num_workers = 8
log_interval = 50
eval_interval = 1015
