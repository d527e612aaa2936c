"""The model card's Jinja template (rendered by `huggingface_hub.ModelCard.from_template`, lemb/trainer/card.py).

Its variables are sentence-transformers' card data (`card_data` as YAML, `model_name`, `output_dimensionality`,
`model_max_length`, `similarity_fn_name`, `model_string`, `version`, `language`, `license`) and lemb's own sections
(`card._sections`). A backslash at a line's end joins it with the next (Python's, before Jinja sees the text).
"""

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

This is {{ "an embedding" if export else "a [sentence-transformers](https://www.SBERT.net)" }} model\
{% if base_link %} finetuned from {{ base_link }}{% endif %} by lemb\
{% if llm_link %} on what the LLM {{ llm_link }} finds useful{% endif %}: \
the LLM-Embedder method (Zhang et al., ACL 2024) of rank-aware rewards and graded distillation. It maps text to a \
{{ output_dimensionality }}-dimensional dense vector space, for retrieval that augments an LLM\
{% if lemb.tasks %}: {% for t in lemb.tasks %}{{ task_names[t] }} ({{ t }}){{ ", " if not loop.last }}{% endfor %}\
{% endif %}.
{% if export %}
This folder is the model in the layout of FlagEmbedding's llm_embedder code: the encoder for `AutoModel` and \
`AutoTokenizer`, pooled by {{ export.pooling_method | join(" + ") }} and compared by cosine; \
`instructions.json` holds each task's instructions, `export.json` the pooling and lengths.
{% endif %}
## Model Details

- **Model Type:** {{ "FlagEmbedding llm_embedder encoder" if export else "Sentence Transformer" }}
- **Base model:** {{ base_detail or "not recorded" }}
- **Labelled by the LLM:** {{ llm_detail or "not recorded" }}\
{% if labels.llm_fingerprint and labels.llm_fingerprint != labels.llm.name %}, \
fingerprint `{{ labels.llm_fingerprint }}`{% endif %}
- **Maximum Sequence Length:** {{ model_max_length }} tokens
- **Output Dimensionality:** {{ output_dimensionality }} dimensions
- **Similarity Function:** {{ similarity_fn_name }}
{% if language %}- **Language:** {{ language | join(", ") }}
{% endif %}{% if license %}- **License:** {{ license }} (the base model's; the terms of the training data may add \
to it)
{% endif %}{% if not export %}
### Full Model Architecture

```
{{ model_string }}
```
{% endif %}
## Usage

{% if export %}Prepend a task's instruction to each text, as the table below gives it (`instructions.json`), and \
pass these flags to FlagEmbedding:
{% else %}Each task has its own instructions, saved with the model as sentence-transformers prompts: \
`<task>_query` for queries and `<task>_key` for the keys to retrieve. Pass the prompt's name to `encode`:
{% endif %}
{{ usage }}

{{ instructions_table }}
{% if metrics_md %}
## Evaluation

`lemb eval` on held-out queries: each embedder as it is meant to be used (by default `base`, the base model \
without lemb's training, and `trained`, this model), the last columns the difference from the base with its \
paired bootstrap 95% interval (and the number of queries paired).

{{ metrics_md }}
{% endif %}{% if lemb.tasks %}
## Training Details

### Labels

- **LLM:** {{ llm_link or "not recorded" }}{% if labels.backend %}, run with {{ labels.backend }}{% endif %}
- **Reward:** `{{ lemb.reward }}`, {{ reward_text }}
{% if labels.n_samples %}- **Pool:** the LLM's own samples, {{ labels.n_samples }} without a \
candidate (`n_samples`) and {{ labels.per_candidate_samples }} from each candidate's prompt \
(`per_candidate_samples`), temperature {{ labels.temperature }}; N is the pool's size once empty samples and \
copies of the desired output are dropped. Every output is scored by its {{ labels.reduce }} token \
log-probability
- **Tie tolerance:** {{ labels.tie_tolerance }} nats (a sample this close to the desired output ties with it)
{% endif %}
### Loss

{% for name, text in losses.items() %}- `{{ name }}`: {{ text }}
{% endfor %}- **tau:** {{ lemb.tau }}, **alpha:** {{ lemb.alpha }}, **group size:** {{ lemb.group_size }} \
candidates per query

| task | queries | candidates | loss | in-batch negatives |
|---|---|---|---|---|
{% for t, n in lemb.tasks.items() %}| {{ t }} | {{ n.queries }} | {{ n.candidates }} | {{ n.loss }} | \
{{ "yes" if n.in_batch_negatives else "no" }} |
{% endfor %}{% if lemb.queries_left_out %}
Not trained on, by reason: {% for reason, n in lemb.queries_left_out.items() %}{{ n }} ({{ reason }})\
{{ ", " if not loop.last }}{% endfor %}.
{% endif %}
### Training Hyperparameters

- **steps:** {{ lemb.steps }}, **batch size:** {{ lemb.batch_size }} queries of one task
- **learning rate:** {{ lemb.lr }} (AdamW, warm-up {{ lemb.warmup }} of the steps, weight decay \
{{ lemb.weight_decay }}{% if lemb.max_grad_norm %}, gradients clipped to norm {{ lemb.max_grad_norm }}{% endif %})
- **precision:** {{ lemb.precision }}, **max length:** {{ lemb.max_length }} tokens, **seed:** {{ lemb.seed }}
{% if lemb.lora %}- **LoRA:** r {{ lemb.lora.r }}, alpha {{ lemb.lora.alpha }}, dropout {{ lemb.lora.dropout }}, on \
{{ lemb.lora.targets | join(", ") if lemb.lora.targets else "peft's default layers for the model type" }}; \
{% if lemb.lora.merged %}merged into the base weights in this folder{% else %}this folder holds the adapters only \
(sentence-transformers loads it with peft installed){% endif %}
{% endif %}- **task mix:** {{ lemb.task_weights if lemb.task_weights else "by the tasks' sizes" }}\
{% if lemb.self_paced %}, self-paced{% endif %}
- **instructions:** {{ lemb.instructions.name }}: {{ lemb.instructions.source }}
- **training time:** {{ lemb.seconds }} s{% if lemb.final_loss is not none %}, final loss \
{{ "%.4f" | format(lemb.final_loss) }}{% endif %}
{% if lemb.dev %}- **dev evaluation:** {{ lemb.dev.queries }} held-out queries ({{ lemb.dev.tasks | join(", ") }}), \
{% if lemb.dev.every %}every {{ lemb.dev.every }} steps and {% endif %}after the last; the model saved is the \
{{ lemb.dev.keep }} (step {{ lemb.dev.step }}{% if lemb.dev.keep == "best" %}, by {{ lemb.dev.metric }}{% endif %}), \
which scores {% for name, value in lemb.dev.scores.items() if name.startswith("dev/") %}{{ name[4:] }} \
{{ "%.4f" | format(value) }}{{ ", " if not loop.last }}{% endfor %}
{% endif %}{% endif %}
### Framework Versions

- lemb: {{ lemb.version or lemb_version }}
- Python: {{ version["python"] }}
- Sentence Transformers: {{ version["sentence_transformers"] }}
- Transformers: {{ version["transformers"] }}
- PyTorch: {{ version["torch"] }}

## Citation

```bibtex
{{ citation }}
```
"""
