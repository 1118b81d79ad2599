package worker

import (
	"context"
	"net"
	"net/url"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
)

// roundInput is what a discovery round starts from.
type roundInput struct {
	current   Server
	prevOwner string // the owner that just left, not to be asked first
	useEtcd   bool   // etcd answers: ask the live servers it lists first
}

// round asks servers for the app's owner, in order: with etcd, the live
// servers ranked for the app (its successor first, the owner that left
// excluded); without, the current server (see currentControl); then the
// configured servers.
// It resolves the app first if that is still to do. Its caller counts it
// (rounds_total), once it has acted on the result.
func (d *Discovery) round(ctx context.Context, in roundInput) (Server, bool) {
	if err := d.resolveApp(ctx, in.useEtcd); err != nil {
		d.logger.Debug("round: app not resolved", "error", err)
		return Server{}, false
	}
	for _, c := range d.candidates(ctx, in) {
		addr, err := d.api.acquire(ctx, c, d.AppID(), in.current.Address)
		if err == nil {
			return Server{Address: addr}, true
		}
		d.logger.Debug("round: server did not answer", "server", c, "error", err)
		if ctx.Err() != nil {
			break
		}
	}
	return Server{}, false
}

func (d *Discovery) candidates(ctx context.Context, in roundInput) []string {
	var out []string
	seen := map[string]bool{}
	add := func(a string) {
		if a != "" && !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	if in.useEtcd {
		for _, a := range d.rankedServers(ctx, in.prevOwner) {
			add(a)
		}
	} else {
		add(d.currentControl(in.current.Address))
	}
	for _, s := range d.servers {
		add(s)
	}
	return out
}

// currentControl is where to ask the current server, known by its
// transport address: its control address if etcd named it (the owner
// record has both); else, as a PowerJob worker does, the configured server
// on the same host; else nowhere ("") — a transport is never asked.
func (d *Discovery) currentControl(current string) string {
	if c, ok := d.controls.Load(current); ok {
		return c.(string)
	}
	host, _, err := net.SplitHostPort(current)
	if err != nil {
		return ""
	}
	for _, s := range d.servers {
		if u, err := url.Parse(s); err == nil && u.Hostname() == strings.Trim(host, "[]") {
			return s
		}
	}
	return ""
}

// rankedServers lists the live servers' control URLs in the app's
// successor order, without exclude.
func (d *Discovery) rankedServers(ctx context.Context, exclude string) []string {
	ctx, cancel := context.WithTimeout(ctx, d.cfg.RequestTimeout)
	defer cancel()
	resp, err := d.cfg.Client.Get(ctx, d.keys.ServerPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil
	}
	byID := map[string]string{}
	var servers []coord.ServerRecord
	for _, kv := range resp.Kvs {
		rec, err := coord.DecodeServerRecord(kv.Value)
		if err != nil {
			continue
		}
		byID[rec.ServerID] = rec.Control.URL()
		servers = append(servers, rec)
	}
	var out []string
	for _, id := range coord.RankWeighted(d.AppID(), coord.Placement(servers, exclude)) {
		out = append(out, byID[id])
	}
	return out
}
