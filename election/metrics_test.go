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
	if got := testutil.Metric(t, regA, "baton_election_elections_total", ""); got != 3 {
		t.Errorf("a elections = %v, want 3", got)
	}
	if got := testutil.Metric(t, regA, "baton_election_owned_apps", ""); got != 3 {
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
		return testutil.Metric(t, regB, "baton_election_takeovers_total", "") == 3
	})
	if got := testutil.Metric(t, regB, "baton_election_owner_gap_seconds", ""); got != 3 {
		t.Errorf("b owner gap observations = %v, want 3", got)
	}
	// a learns of the revoke from its own watch, which can be a moment
	// behind b's.
	testutil.Eventually(t, 5*time.Second, "a to count 0 owned apps after losing its lease", func() bool {
		return testutil.Metric(t, regA, "baton_election_owned_apps", "") == 0
	})
}
