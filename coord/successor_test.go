package coord_test

import (
	"fmt"
	"slices"
	"testing"

	"github.com/batonhq/baton/coord"
)

func TestRankIsDeterministicAndAgreesWithSuccessor(t *testing.T) {
	servers := []string{"s1", "s2", "s3", "s4"}
	for app := int64(1); app <= 200; app++ {
		r := coord.Rank(app, servers)
		shuffled := []string{servers[2], servers[0], servers[3], servers[1]}
		if !slices.Equal(r, coord.Rank(app, shuffled)) {
			t.Fatalf("app %d: order depends on input order", app)
		}
		if s, ok := coord.Successor(app, shuffled); !ok || s != r[0] {
			t.Fatalf("app %d: Successor %q, Rank %v", app, s, r)
		}
	}
	if _, ok := coord.Successor(1, nil); ok {
		t.Fatal("successor among no servers")
	}
}

func TestRankSpreadsAppsAndMovesOnlyTheLostServersApps(t *testing.T) {
	servers := []string{"s1", "s2", "s3"}
	const apps = 3000
	count := map[string]int{}
	before := map[int64]string{}
	for app := int64(1); app <= apps; app++ {
		s, _ := coord.Successor(app, servers)
		count[s]++
		before[app] = s
	}
	for _, s := range servers {
		// A fair share is 1000; allow a wide band (binomial sd is ~26).
		if count[s] < 850 || count[s] > 1150 {
			t.Errorf("%s is successor of %d of %d apps: %v", s, count[s], apps, count)
		}
	}
	moved := 0
	for app := int64(1); app <= apps; app++ {
		s, _ := coord.Successor(app, []string{"s1", "s3"})
		if before[app] != "s2" && s != before[app] {
			t.Fatalf("app %d moved from %s to %s although %s is still alive", app, before[app], s, before[app])
		}
		if before[app] == "s2" {
			moved++
		}
	}
	if moved != count["s2"] {
		t.Fatalf("moved %d, s2 had %d", moved, count["s2"])
	}
}

func TestRankWeightsArePinned(t *testing.T) {
	// Workers written in other languages must compute the same order, so
	// the weight function is part of the protocol. The expected order was
	// computed independently: Python's hashlib, first 8 bytes of
	// sha256(id + b"\x00" + b"42") — d c38b..., b aacf..., a 98d9..., c 4e7a....
	got := fmt.Sprint(coord.Rank(42, []string{"a", "b", "c", "d"}))
	if want := "[d b a c]"; got != want {
		t.Fatalf("Rank(42) = %s, want %s", got, want)
	}
}
