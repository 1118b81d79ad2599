package worker

import (
	"fmt"

	"github.com/batonhq/baton/internal/metricset"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the worker's Prometheus metrics; a nil *metrics records
// nothing.
type metrics struct {
	requests prometheus.Counter
	rounds   *prometheus.CounterVec
	changes  prometheus.Counter
	isolates prometheus.Counter
	watching prometheus.Gauge
	set      *metricset.Set
}

func newMetrics(reg prometheus.Registerer, app string) (*metrics, error) {
	if reg == nil {
		return nil, nil
	}
	labels := prometheus.Labels{"app_name": app}
	opts := func(name, help string) prometheus.Opts {
		return prometheus.Opts{Namespace: "baton", Subsystem: "worker", Name: name, Help: help, ConstLabels: labels}
	}
	m := &metrics{
		requests: prometheus.NewCounter(prometheus.CounterOpts(opts("http_requests_total", "HTTP requests sent to servers (assert and acquire)."))),
		rounds:   prometheus.NewCounterVec(prometheus.CounterOpts(opts("rounds_total", "Discovery rounds by outcome: found, failed.")), []string{"outcome"}),
		changes:  prometheus.NewCounter(prometheus.CounterOpts(opts("changes_total", "Changes of the current server."))),
		isolates: prometheus.NewCounter(prometheus.CounterOpts(opts("isolations_total", "Times the worker became isolated."))),
		watching: prometheus.NewGauge(prometheus.GaugeOpts(opts("watching", "1 while the worker follows the owner key in etcd, 0 while it polls."))),
	}
	set, err := metricset.Register(reg, m.requests, m.rounds, m.changes, m.isolates, m.watching)
	if err != nil {
		return nil, fmt.Errorf("worker: register metrics: %w", err)
	}
	m.set = set
	return m, nil
}

// unregister takes the metrics out of their registry (at Close), so that
// a new Discovery of the same app can register them again.
func (m *metrics) unregister() {
	if m != nil {
		m.set.Unregister()
	}
}

func (m *metrics) request() {
	if m != nil {
		m.requests.Inc()
	}
}

func (m *metrics) round(found bool) {
	if m != nil {
		outcome := "failed"
		if found {
			outcome = "found"
		}
		m.rounds.WithLabelValues(outcome).Inc()
	}
}

func (m *metrics) changed() {
	if m != nil {
		m.changes.Inc()
	}
}

func (m *metrics) isolated() {
	if m != nil {
		m.isolates.Inc()
	}
}

func (m *metrics) setWatching(on bool) {
	if m != nil {
		v := 0.0
		if on {
			v = 1
		}
		m.watching.Set(v)
	}
}
