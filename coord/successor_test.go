package coord_test

import (
	"fmt"
	"math"
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

func weighted(ids []string, weights ...float64) []coord.Weighted {
	out := make([]coord.Weighted, len(ids))
	for i, id := range ids {
		out[i] = coord.Weighted{ID: id, Weight: weights[i%len(weights)]}
	}
	return out
}

// With equal weights RankWeighted (which Rank now is) puts first the
// server of the highest hash, as Successor, computed separately, does:
// switching to weights changes no placement until weights differ.
// TestRankWeightsArePinned pins the rest of the order.
func TestRankWeightedWithEqualWeightsKeepsTheHashOrder(t *testing.T) {
	ids := []string{"s1", "s2", "s3", "s4", "s5"}
	for app := int64(1); app <= 5000; app++ {
		want, _ := coord.Successor(app, ids)
		if got := coord.RankWeighted(app, weighted(ids, 3)); got[0] != want {
			t.Fatalf("app %d: RankWeighted puts %s first, Successor says %s", app, got[0], want)
		}
	}
}

// Shares follow the weights; a cordoned server (weight 0) is first for no
// app; re-weighting one server moves apps only to or from it.
func TestRankWeightedSharesAndMoves(t *testing.T) {
	const apps = 100000
	ids := []string{"a", "b", "c"}
	first := func(w []coord.Weighted) map[int64]string {
		out := map[int64]string{}
		for app := int64(1); app <= apps; app++ {
			out[app] = coord.RankWeighted(app, w)[0]
		}
		return out
	}
	share := func(placed map[int64]string, id string) float64 {
		n := 0
		for _, s := range placed {
			if s == id {
				n++
			}
		}
		return float64(n) / apps
	}
	even := first(weighted(ids, 1))
	heavy := first(weighted(ids, 1, 1, 2))
	for id, want := range map[string]float64{"a": 0.25, "b": 0.25, "c": 0.5} {
		if got := share(heavy, id); math.Abs(got-want) > 0.01 {
			t.Errorf("weights 1,1,2: %s has %.3f of the apps, want %.2f", id, got, want)
		}
	}
	for app, s := range heavy {
		if s != even[app] && s != "c" {
			t.Fatalf("raising c's weight moved app %d from %s to %s", app, even[app], s)
		}
	}
	cordoned := first(weighted(ids, 1, 1, 0))
	if got := share(cordoned, "c"); got != 0 {
		t.Errorf("a cordoned server is first for %.3f of the apps", got)
	}
	for app, s := range cordoned {
		if s != even[app] && even[app] != "c" {
			t.Fatalf("cordoning c moved app %d from %s to %s", app, even[app], s)
		}
	}
	if got := coord.RankWeighted(7, weighted(ids, 0)); !slices.Equal(got, coord.Rank(7, ids)) {
		t.Errorf("all cordoned: %v, want Rank's order %v", got, coord.Rank(7, ids))
	}
}
