package election_test

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/testutil"
)

func TestMetricsCountElectionsTakeoversAndOwnedApps(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	regA, regB := prometheus.NewRegistry(), prometheus.NewRegistry()
	a := c.addNode("a", withConfig(func(cfg *election.Config) { cfg.Registerer = regA }))
	b := c.addNode("b", withConfig(func(cfg *election.Config) { cfg.Registerer = regB }))
	apps := c.registerN(t, 3)
	electAll(t, c, a, apps)
	if got := gather(t, regA, "baton_election_elections_total"); got != 3 {
		t.Errorf("a elections = %v, want 3", got)
	}
	if got := gather(t, regA, "baton_election_owned_apps"); got != 3 {
		t.Errorf("a owned = %v, want 3", got)
	}
	if s, ok := a.el.Successor(apps[0]); !ok || s.ServerID != "b" {
		t.Errorf("successor of a's app = %+v, %v; want b", s, ok)
	}
	if _, err := c.etcd.Client().Revoke(context.Background(), a.session.Lease()); err != nil {
		t.Fatal(err)
	}
	if !c.rec.wait(5*time.Second, func([]event) bool { return len(b.el.Owned()) == 3 }) {
		t.Fatal("b did not take over")
	}
	// The counters move right after the ownerships start.
	testutil.Eventually(t, 5*time.Second, "3 takeovers counted", func() bool {
		return gather(t, regB, "baton_election_takeovers_total") == 3
	})
	if got := gather(t, regB, "baton_election_owner_gap_seconds"); got != 3 {
		t.Errorf("b owner gap observations = %v, want 3", got)
	}
	if got := gather(t, regA, "baton_election_owned_apps"); got != 0 {
		t.Errorf("a owned = %v after losing its lease, want 0", got)
	}
}

// gather sums a metric's values (histograms: sample counts) in reg.
func gather(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			case m.Histogram != nil:
				sum += float64(m.Histogram.GetSampleCount())
			}
		}
	}
	return sum
}
