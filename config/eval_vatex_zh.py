# Evaluate on VATEX with its Chinese captions (BERT text encoder): 1,500 test videos x 10 captions.
# $ python eval.py config/eval_vatex_zh.py --init_from=out-finetune-vatex-zh/ckpt.pt
# The tokenizer's vocab.txt comes from the checkpoint's config (bert_vocab / bert_path); pass --bert_vocab=... if
# the checkpoint was trained elsewhere.
dataset = "vatex"
split = "test"
caption_field = "captions_zh"
