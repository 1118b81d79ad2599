// Package metricset registers a component's Prometheus collectors
// together and unregisters them together, so that a component closed and
// started again in one process (a node restarted with the same registry)
// can register its metrics again.
package metricset

import "github.com/prometheus/client_golang/prometheus"

// Set is collectors registered with one Registerer.
type Set struct {
	reg        prometheus.Registerer
	collectors []prometheus.Collector
}

// Register registers every collector with reg. If one fails, those
// already registered are unregistered again and the error is returned.
func Register(reg prometheus.Registerer, collectors ...prometheus.Collector) (*Set, error) {
	s := &Set{reg: reg}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			s.Unregister()
			return nil, err
		}
		s.collectors = append(s.collectors, c)
	}
	return s, nil
}

// Unregister unregisters the set's collectors. It is idempotent, and does
// nothing on a nil Set.
func (s *Set) Unregister() {
	if s == nil {
		return
	}
	for _, c := range s.collectors {
		s.reg.Unregister(c)
	}
	s.collectors = nil
}
