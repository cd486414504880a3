# Fine-tune HMMC on VATEX with the Chinese captions and the Chinese BERT text encoder.
# $ torchrun --standalone --nproc_per_node=8 train.py config/finetune_vatex_zh.py
# Needs data/vatex (with captions_zh), the Chinese pre-training checkpoint (config/pretrain_chvtt.py) or
# --init_from=clip with bert_path = the HF folder of hfl/chinese-roberta-wwm-ext.
# Chinese captions get [CLS]/[SEP] (the original fed [UNK] on VATEX-zh). BERT trains at 1e-5 (the
# original's default text_lr): unlike the CLIP text tower it was never effectively frozen, and the only VATEX
# command of the original README (--text_lr 3e-5 --coef_lr 8e-1, left over from fine-tuning) is an English one.
# Its --coef_lr 8e-1 sets the CLIP vision tower here as well: 1e-4 x 0.8, so the tower trains.
# Batch: 256 videos per step = 32 per GPU x 8 GPUs x 1; 1,015 steps per epoch, 5 epochs = 5,075 steps.
out_dir = "out-finetune-vatex-zh"
dataset = "vatex"
init_from = "out-pretrain-chvtt/ckpt.pt"
text_encoder = "bert"
bert_path = "chinese-roberta-wwm-ext"
caption_field = "captions_zh"
num_frames = 12
image_size = 224
context_length = 32
eval_context_length = 32  # the benchmarks' caption length, whatever the training length
frame_sample = "random"
temporal_layers = 4
batch_size = 256
epochs = 5
learning_rate = 1e-4
text_lr = 1e-5
clip_lr_scale = 0.8  # the original README's VATEX command (--coef_lr 8e-1)
eval_batch_size = 256
num_workers = 8
log_interval = 50
eval_interval = 1015
