package coord

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/batonhq/baton/internal/metricset"
)

// sessionMetrics are the session's Prometheus metrics; a nil
// *sessionMetrics records nothing.
type sessionMetrics struct {
	rounds     *prometheus.HistogramVec
	guardFires prometheus.Counter
	leaseEnds  *prometheus.CounterVec
	set        *metricset.Set
}

func newSessionMetrics(reg prometheus.Registerer, s *Session) (*sessionMetrics, error) {
	if reg == nil {
		return nil, nil
	}
	m := &sessionMetrics{
		rounds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "baton", Subsystem: "session", Name: "round_seconds",
			Help:    "Duration of confirmation rounds (keepalive, linearizable read, watch progress), by outcome: confirmed, failed.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"outcome"}),
		guardFires: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "baton", Subsystem: "session", Name: "guard_fires_total",
			Help: "Times the guard deadline passed unconfirmed and the server stopped acting as owner.",
		}),
		leaseEnds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "baton", Subsystem: "session", Name: "lease_losses_total",
			Help: "Leases this server lost (etcd no longer had them) or gave up (kept alive but unconfirmable for a TTL), by reason: lost, given_up.",
		}, []string{"reason"}),
	}
	deadline := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "baton", Subsystem: "session", Name: "deadline_seconds",
		Help: "Time left until the guard deadline of the current epoch; 0 once it has ended.",
	}, func() float64 {
		e := s.Epoch()
		if e.Err() != nil {
			return 0
		}
		return max(time.Duration(e.deadline.Load()-s.clock.now()), 0).Seconds()
	})
	confirmed := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "baton", Subsystem: "session", Name: "confirmed",
		Help: "1 while the lease is confirmed and the server may act as owner, else 0.",
	}, func() float64 {
		if s.Check() != nil {
			return 0
		}
		return 1
	})
	set, err := metricset.Register(reg, m.rounds, m.guardFires, m.leaseEnds, deadline, confirmed)
	if err != nil {
		return nil, fmt.Errorf("coord: register session metrics: %w", err)
	}
	m.set = set
	return m, nil
}

func (m *sessionMetrics) round(d time.Duration, ok bool) {
	if m != nil {
		outcome := "failed"
		if ok {
			outcome = "confirmed"
		}
		m.rounds.WithLabelValues(outcome).Observe(d.Seconds())
	}
}

func (m *sessionMetrics) guardFired() {
	if m != nil {
		m.guardFires.Inc()
	}
}

func (m *sessionMetrics) leaseEnded(reason string) {
	if m != nil {
		m.leaseEnds.WithLabelValues(reason).Inc()
	}
}

func (m *sessionMetrics) unregister() {
	if m != nil {
		m.set.Unregister()
	}
}
