package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/worker"
)

// The random run's liveness check is the second promise of DESIGN.md,
// taken literally: after a step heals, within the largest TTL in play +
// 1 s (+ slack), every app's owner key in etcd names a server whose
// ownership is acting — that node's /server/hello says it acts for the
// app with the key's ModRevision as its token and its guard is
// confirmed, and the checker's one open interval for the app is that
// ownership — and every worker's Current names that server: its
// address, its ServerID and the same token. Both halves must hold at one
// look; the time until the first half held is the step's time-to-acting.

// follower is a worker discovery under a name a failure can report.
type follower struct {
	name string
	d    *worker.Discovery
}

// ownerKey is one app's owner key as etcd holds it.
type ownerKey struct {
	exists   bool
	serverID string
	token    int64 // ModRevision: the ownership's fencing token
	lease    int64
	err      error // the record does not decode
}

func (k ownerKey) String() string {
	switch {
	case !k.exists:
		return "none"
	case k.err != nil:
		return fmt.Sprintf("undecodable (token %d, lease %x): %v", k.token, k.lease, k.err)
	default:
		return fmt.Sprintf("%s token %d lease %x", k.serverID, k.token, k.lease)
	}
}

// ownerKeys reads every owner key of the group in one request.
func (g *group) ownerKeys(ctx context.Context) (map[int64]ownerKey, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	resp, err := g.r.etcd.Client().Get(ctx, g.c.keys.OwnerPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	out := map[int64]ownerKey{}
	for _, kv := range resp.Kvs {
		app, err := g.c.keys.AppIDFromOwnerKey(string(kv.Key))
		if err != nil {
			continue
		}
		k := ownerKey{exists: true, token: kv.ModRevision, lease: kv.Lease}
		rec, err := coord.DecodeOwnerRecord(kv.Value)
		k.serverID, k.err = rec.ServerID, err
		out[app] = k
	}
	return out, nil
}

// liveView is one look at the second promise: what keeps an app from
// having an acting owner named by its key, and which workers do not
// name that owner. Both empty: the promise holds.
type liveView struct {
	apps    []string
	workers []string
}

// look checks the second promise once. Intervals of exclude (a node that
// is paused or cut off and whose end stamps may still be on their way)
// do not count, and exclude must not be the owner. Unless full, it stops
// at the checker's open intervals when they already fail, without asking
// etcd and the nodes.
func (g *group) look(ctx context.Context, workers []follower, exclude string, full bool) liveView {
	var v liveView
	// First what costs nothing: one open interval per app.
	open := g.c.check.openIntervals()
	for _, app := range g.apps {
		var ivs []interval
		for _, iv := range open[app] {
			if iv.server != exclude {
				ivs = append(ivs, iv)
			}
		}
		if len(ivs) != 1 {
			v.apps = append(v.apps, fmt.Sprintf("app %d: the checker's open intervals: %s", app, describe(ivs)))
		}
	}
	if len(v.apps) > 0 && !full {
		return v
	}
	keys, err := g.ownerKeys(ctx)
	if err != nil {
		v.apps = append(v.apps, "reading the owner keys: "+err.Error())
		return v
	}
	ask := map[string]bool{}
	for _, app := range g.apps {
		if k := keys[app]; k.exists && k.err == nil && g.c.nodes[k.serverID] != nil && k.serverID != exclude {
			ask[k.serverID] = true
		}
	}
	hs := g.hellos(ctx, ask)
	for _, app := range g.apps {
		k := keys[app]
		key := g.c.keys.Owner(app)
		var ivs []interval
		for _, iv := range open[app] {
			if iv.server != exclude {
				ivs = append(ivs, iv)
			}
		}
		switch h, isNode := hs[k.serverID]; {
		case !k.exists:
			v.apps = append(v.apps, fmt.Sprintf("app %d: no owner key %s (acting: %s)", app, key, describe(ivs)))
		case k.err != nil:
			v.apps = append(v.apps, fmt.Sprintf("app %d: key %s is %s", app, key, k))
		case k.serverID == exclude:
			v.apps = append(v.apps, fmt.Sprintf("app %d: key %s names %s, which is paused, cut off or drained", app, key, k))
		case g.c.nodes[k.serverID] == nil:
			v.apps = append(v.apps, fmt.Sprintf("app %d: key %s names %s, not a node of %s", app, key, k, g.name))
		case !isNode || h.err != nil:
			v.apps = append(v.apps, fmt.Sprintf("app %d: key %s names %s, whose /server/hello failed: %v", app, key, k, h.err))
		case !h.confirmed || h.owned[app] != k.token:
			v.apps = append(v.apps, fmt.Sprintf("app %d: key %s names %s; %s says confirmed %v, acts with token %d", app, key, k, k.serverID, h.confirmed, h.owned[app]))
		case len(ivs) != 1 || ivs[0].server != k.serverID || ivs[0].token != k.token:
			v.apps = append(v.apps, fmt.Sprintf("app %d: key %s names %s; the checker's open intervals: %s", app, key, k, describe(ivs)))
		}
	}
	for _, w := range workers {
		app := w.d.AppID()
		k := keys[app]
		cur, known := w.d.Current()
		public := ""
		if p := g.c.nodes[k.serverID]; p != nil {
			public = p.public
		}
		if why := followWhy(cur, known, k, public); why != "" {
			v.workers = append(v.workers, fmt.Sprintf("worker %s (app %d) %s", w.name, app, why))
		}
	}
	return v
}

// followWhy says why a worker at cur (known: it has one) does not follow
// the owner that key names, whose node answers workers at public; "" if
// it does.
func followWhy(cur worker.Server, known bool, k ownerKey, public string) string {
	switch {
	case !k.exists || k.err != nil || public == "":
		return fmt.Sprintf("cannot follow: key %s", k)
	case !known:
		return fmt.Sprintf("has no server; key names %s at %s", k, public)
	case cur.Address != public || cur.ServerID != k.serverID || cur.Token != k.token:
		return fmt.Sprintf("is at %s (%q token %d); key names %s at %s", cur.Address, cur.ServerID, cur.Token, k, public)
	}
	return ""
}

func describe(ivs []interval) string {
	if len(ivs) == 0 {
		return "none"
	}
	var s []string
	for _, iv := range ivs {
		s = append(s, fmt.Sprintf("%s token %d", iv.server, iv.token))
	}
	sort.Strings(s)
	return strings.Join(s, ", ")
}

// waitLive waits until the second promise holds (see look) and returns
// how long after from its first half (every app acting) held, and what
// the last looks before each half held found missing (for a slow step's
// log). It
// wakes on every checker event and worker change, and every 50 ms to look
// again; at deadline it fails with what was wrong at a last, full look.
func (g *group) waitLive(ctx context.Context, from, deadline time.Time, workers []follower, exclude string) (time.Duration, string, error) {
	timer := time.NewTimer(max(time.Until(deadline), 0))
	defer timer.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	acting := time.Duration(-1)
	var waited, lagged []string
	for {
		checked, moved := g.c.check.changes(), g.moved.wait()
		v := g.look(ctx, workers, exclude, false)
		if len(v.apps) == 0 && acting < 0 {
			acting = max(time.Since(from), 0)
		}
		if len(v.apps) == 0 && len(v.workers) == 0 {
			if len(lagged) > 0 {
				waited = append(waited, fmt.Sprintf("then %d workers, e.g. %s", len(lagged), lagged[0]))
			}
			return acting, strings.Join(waited, "; "), nil
		}
		if acting < 0 {
			waited = v.apps
		} else if len(v.workers) > 0 {
			lagged = v.workers
		}
		select {
		case <-checked:
		case <-moved:
		case <-tick.C:
		case <-ctx.Done():
			return acting, "", ctx.Err()
		case <-timer.C:
			v = g.look(ctx, workers, exclude, true)
			var why []string
			if len(v.apps) > 0 {
				why = append(why, fmt.Sprintf("not every app acting %v after healing: %s",
					deadline.Sub(from).Round(time.Millisecond), strings.Join(v.apps, "; ")))
			} else if acting >= 0 {
				why = append(why, fmt.Sprintf("every app acting after %v, but", acting.Round(time.Millisecond)))
			}
			if len(v.workers) > 0 {
				const most = 8
				shown := v.workers[:min(len(v.workers), most)]
				more := ""
				if len(v.workers) > most {
					more = fmt.Sprintf(" (and %d more workers)", len(v.workers)-most)
				}
				why = append(why, fmt.Sprintf("%d workers not following the owner named by the key: %s%s",
					len(v.workers), strings.Join(shown, "; "), more))
			}
			if len(why) == 0 {
				why = append(why, fmt.Sprintf("live only at the last look, %v after healing", deadline.Sub(from).Round(time.Millisecond)))
			}
			return acting, "", fmt.Errorf("%s", strings.Join(why, "; "))
		}
	}
}

// hello is what a node's /server/hello says: whether its guard is
// confirmed, and the apps it acts for with their tokens.
type hello struct {
	confirmed bool
	owned     map[int64]int64
	err       error
}

// hellos asks the nodes named in ids (every node when ids is nil) at
// once, each for at most a second.
func (g *group) hellos(ctx context.Context, ids map[string]bool) map[string]hello {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	var mu sync.Mutex
	out := map[string]hello{}
	var wg sync.WaitGroup
	for id, p := range g.c.nodes {
		if ids != nil && !ids[id] {
			continue
		}
		wg.Go(func() {
			h := hello{owned: map[int64]int64{}}
			var body struct {
				Data struct {
					Owned []struct {
						AppID int64 `json:"appId"`
						Token int64 `json:"token"`
					} `json:"owned"`
					Lease struct {
						Confirmed bool `json:"confirmed"`
					} `json:"lease"`
				} `json:"data"`
			}
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.addr+"/server/hello", nil)
			resp, err := g.c.http.Do(req)
			if err == nil {
				err = json.NewDecoder(resp.Body).Decode(&body)
				resp.Body.Close()
			}
			h.err, h.confirmed = err, body.Data.Lease.Confirmed
			for _, o := range body.Data.Owned {
				h.owned[o.AppID] = o.Token
			}
			mu.Lock()
			out[id] = h
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}

// diagnose describes, for a liveness failure, every app's owner key with
// its lease's time to live and its displacement markers, the checker's
// open intervals, and what each node says.
func (g *group) diagnose(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	cli := g.r.etcd.Client()
	open := g.c.check.openIntervals()
	keys, err := g.ownerKeys(ctx)
	if err != nil {
		return "reading the owner keys: " + err.Error()
	}
	var out []string
	for _, app := range g.apps {
		k := keys[app]
		desc := fmt.Sprintf("app %d: key %s: %s", app, g.c.keys.Owner(app), k)
		if k.lease != 0 {
			if ttl, err := cli.TimeToLive(ctx, clientv3.LeaseID(k.lease)); err == nil {
				desc += fmt.Sprintf(" (ttl %ds)", ttl.TTL)
			}
		}
		if resp, err := cli.Get(ctx, g.c.keys.Displaced(app), clientv3.WithPrefix()); err == nil {
			for _, kv := range resp.Kvs {
				desc += fmt.Sprintf("; marker %s lease %x %s", kv.Key, kv.Lease, kv.Value)
			}
		}
		desc += "; acting: " + describe(open[app])
		out = append(out, desc)
	}
	hs := g.hellos(ctx, nil)
	ids := make([]string, 0, len(hs))
	for id := range hs {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		h := hs[id]
		if h.err != nil {
			out = append(out, fmt.Sprintf("%s: %v", id, h.err))
		} else {
			out = append(out, fmt.Sprintf("%s: confirmed %v, acts for %v", id, h.confirmed, h.owned))
		}
	}
	return strings.Join(out, "\n\t")
}

// longest keeps the longest time-to-acting of the run and where it was
// measured.
type longest struct {
	mu    sync.Mutex
	d     time.Duration
	where string
}

func (l *longest) note(d time.Duration, where string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if d >= l.d {
		l.d, l.where = d, where
	}
}

func (l *longest) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.where == "" {
		return "none measured"
	}
	return fmt.Sprintf("%v (%s)", l.d.Round(time.Millisecond), l.where)
}
