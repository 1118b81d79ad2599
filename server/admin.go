package server

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
)

// adminRoutes mounts the admin API; every route needs the bearer token.
func (n *Node) adminRoutes(mux *http.ServeMux) {
	route(mux, "/admin/apps", n.admin(n.handleRegister), http.MethodPost)
	route(mux, "/admin/owners", n.admin(n.handleOwners), http.MethodGet)
	route(mux, "/admin/handover", n.admin(n.handleHandOver), http.MethodPost)
	route(mux, "/admin/drain", n.admin(n.handleDrain), http.MethodPost)
	route(mux, "/admin/servers", n.admin(n.handleServers), http.MethodGet)
	route(mux, "/admin/cordon", n.admin(n.handleCordon(true)), http.MethodPost)
	route(mux, "/admin/uncordon", n.admin(n.handleCordon(false)), http.MethodPost)
}

// admin checks the bearer token in constant time before h runs.
func (n *Node) admin(h func(http.ResponseWriter, *http.Request, *running)) http.HandlerFunc {
	want := sha256.Sum256([]byte(n.cfg.AdminToken))
	return n.needsRunning(func(w http.ResponseWriter, r *http.Request, run *running) {
		auth := r.Header.Get("Authorization")
		scheme, token, found := strings.Cut(auth, " ")
		found = found && strings.EqualFold(scheme, "Bearer") // schemes are case-insensitive
		got := sha256.Sum256([]byte(token))
		// Comparing digests keeps the comparison constant-time whatever
		// the token's length.
		if !found || subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="baton"`)
			writeResult(w, http.StatusUnauthorized, Result{Message: "admin token missing or wrong"})
			return
		}
		h(w, r, run)
	})
}

func (n *Node) handleRegister(w http.ResponseWriter, r *http.Request, _ *running) {
	name, err := rawAppName(r.URL.RawQuery)
	if err == nil {
		err = coord.ValidateName(name)
	}
	if err != nil {
		badRequest(w, err.Error())
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	app, err := n.registry.Register(ctx, name)
	if err != nil {
		failed(w, err.Error())
		return
	}
	n.apps.add(app)
	ok(w, appInfo{AppID: app.ID, AppName: app.Name})
}

// owner is one row of /admin/owners.
type owner struct {
	AppID    int64  `json:"appId"`
	ServerID string `json:"serverId"`
	Token    int64  `json:"token"`
}

func (n *Node) handleOwners(w http.ResponseWriter, r *http.Request, _ *running) {
	owners, err := n.readOwners(r.Context())
	if err != nil {
		failed(w, err.Error())
		return
	}
	ok(w, owners)
}

// readOwners reads every owner key (one request, within 5 s); keys it
// cannot decode are left out.
func (n *Node) readOwners(ctx context.Context) ([]owner, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := n.cfg.Client.Get(ctx, n.keys.OwnerPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	owners := []owner{}
	for _, kv := range resp.Kvs {
		app, err := n.keys.AppIDFromOwnerKey(string(kv.Key))
		if err != nil {
			continue
		}
		rec, err := coord.DecodeOwnerRecord(kv.Value)
		if err != nil {
			continue
		}
		owners = append(owners, owner{AppID: app, ServerID: rec.ServerID, Token: kv.ModRevision})
	}
	return owners, nil
}

// serverRow is one row of /admin/servers: a live server, its placement,
// and how many apps its owner keys name.
type serverRow struct {
	ServerID string         `json:"serverId"`
	Control  coord.Endpoint `json:"control"`
	Weight   float64        `json:"weight"`
	Cordoned bool           `json:"cordoned"`
	Apps     int            `json:"apps"`
}

// handleServers lists the live servers with their weights and the apps
// each owns (from one read of the owner keys), in id order.
func (n *Node) handleServers(w http.ResponseWriter, r *http.Request, run *running) {
	owners, err := n.readOwners(r.Context())
	if err != nil {
		failed(w, err.Error())
		return
	}
	apps := map[string]int{}
	for _, o := range owners {
		apps[o.ServerID]++
	}
	rows := []serverRow{}
	for _, s := range run.elector.Members().Servers() {
		rows = append(rows, serverRow{ServerID: s.ServerID, Control: s.Control, Weight: s.PlacementWeight(), Cordoned: s.Cordoned, Apps: apps[s.ServerID]})
	}
	slices.SortFunc(rows, func(a, b serverRow) int { return strings.Compare(a.ServerID, b.ServerID) })
	ok(w, rows)
}

func (n *Node) handleHandOver(w http.ResponseWriter, r *http.Request, run *running) {
	app, err := appIDParam(r.URL.Query())
	if err != nil {
		badRequest(w, err.Error())
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	to, err := run.elector.HandOver(ctx, app)
	if err != nil {
		failed(w, err.Error())
		return
	}
	ok(w, map[string]any{"appId": app, "newOwner": to})
}

// handleDrain drains the node. The drain is not bound to the request: a
// client that hangs up does not cut it short.
func (n *Node) handleDrain(w http.ResponseWriter, r *http.Request, _ *running) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 10*time.Second)
	defer cancel()
	if err := n.Drain(ctx); err != nil {
		failed(w, err.Error())
		return
	}
	ok(w, true)
}
