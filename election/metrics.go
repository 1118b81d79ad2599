package election

import (
	"fmt"

	"github.com/batonhq/baton/internal/metricset"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the elector's Prometheus metrics; a nil *metrics records
// nothing, so call sites need no checks.
type metrics struct {
	elections   *prometheus.CounterVec
	takeovers   prometheus.Counter
	depositions prometheus.Counter
	rebalances  prometheus.Counter
	owned       prometheus.Gauge
	ownerGap    prometheus.Histogram
	set         *metricset.Set
}

func newMetrics(reg prometheus.Registerer, serverID string) (*metrics, error) {
	if reg == nil {
		return nil, nil
	}
	labels := prometheus.Labels{"server_id": serverID}
	m := &metrics{
		elections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "baton", Subsystem: "election", Name: "elections_total",
			Help: "Elections run by this server (not fast-path answers), by outcome: won, placed (on another server), other_owner, failed.", ConstLabels: labels,
		}, []string{"outcome"}),
		takeovers: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "baton", Subsystem: "election", Name: "takeovers_total",
			Help: "Apps this server took over as successor after their owner key disappeared.", ConstLabels: labels,
		}),
		depositions: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "baton", Subsystem: "election", Name: "depositions_total",
			Help: "Ownerships of this server ended because another server wrote the owner key.", ConstLabels: labels,
		}),
		rebalances: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "baton", Subsystem: "election", Name: "rebalanced_total",
			Help: "Apps this server handed to their preferred server by rebalancing.", ConstLabels: labels,
		}),
		owned: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "baton", Subsystem: "election", Name: "owned_apps",
			Help: "Apps this server owns and acts for right now.", ConstLabels: labels,
		}),
		ownerGap: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "baton", Subsystem: "election", Name: "owner_gap_seconds",
			Help:        "Time from seeing an owner key deleted to owning the app as its successor.",
			ConstLabels: labels,
			Buckets:     prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
	}
	set, err := metricset.Register(reg, m.elections, m.takeovers, m.depositions, m.rebalances, m.owned, m.ownerGap)
	if err != nil {
		return nil, fmt.Errorf("election: register metrics: %w", err)
	}
	m.set = set
	return m, nil
}

// unregister takes the metrics out of their registry (at Close), so that
// an elector of the same server id can register them again.
func (m *metrics) unregister() {
	if m != nil {
		m.set.Unregister()
	}
}

func (m *metrics) election(outcome string) {
	if m != nil {
		m.elections.WithLabelValues(outcome).Inc()
	}
}

func (m *metrics) takeover(gapSeconds float64) {
	if m != nil {
		m.takeovers.Inc()
		m.ownerGap.Observe(gapSeconds)
	}
}

func (m *metrics) deposed() {
	if m != nil {
		m.depositions.Inc()
	}
}

func (m *metrics) rebalanced(n int) {
	if m != nil {
		m.rebalances.Add(float64(n))
	}
}

func (m *metrics) setOwned(n int) {
	if m != nil {
		m.owned.Set(float64(n))
	}
}
