"""The tracing sampler: spans record only when something exports them, and trace ids exist either way."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from imgsearch.kit.tracing import _sampler


def test_without_an_exporter_spans_record_nothing_but_keep_a_trace_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    tracer = TracerProvider(sampler=_sampler(None)).get_tracer("t")
    with tracer.start_as_current_span("root") as root:
        assert not root.is_recording()
        context = root.get_span_context()
        assert context.is_valid and context.trace_id != 0 and not context.trace_flags.sampled
        with tracer.start_as_current_span("child") as child:
            # The same trace continues, so every log line of one request shares its id.
            assert child.get_span_context().trace_id == context.trace_id
            assert child.get_span_context().span_id != context.span_id


def test_a_sampled_caller_stays_sampled_downstream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    tracer = TracerProvider(sampler=_sampler(None)).get_tracer("t")
    parent = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    with tracer.start_as_current_span("server", context=trace.set_span_in_context(NonRecordingSpan(parent))) as span:
        assert span.is_recording()
        assert span.get_span_context().trace_id == 0x1234


def test_an_exporter_or_an_explicit_sampler_leaves_the_choice_to_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    assert _sampler("http://collector:4317") is None
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    assert _sampler(None) is None
