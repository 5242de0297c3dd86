"""Webhooks as OpenAI sends them: fine-tuning jobs' ends, signed as Standard Webhooks."""
