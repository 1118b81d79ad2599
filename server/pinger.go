package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
)

// HTTPPinger pings another baton server at GET /friend/ping on its
// control endpoint (HTTPS when the endpoint says TLS), as the elector does
// before taking an app from a live owner. It is safe for concurrent use.
type HTTPPinger struct {
	// Client sends the pings; it must trust the peers' certificates when
	// they serve TLS. Nil means http.DefaultClient. ctx bounds each ping.
	Client *http.Client
}

// pingAnswer is /friend/ping's data: who answered, its transports, and
// whether its guard is unconfirmed (omitted when confirmed, as servers
// before this field never sent it).
type pingAnswer struct {
	ServerID    string          `json:"serverId"`
	Protocols   coord.Protocols `json:"protocols"`
	Unconfirmed bool            `json:"unconfirmed,omitempty"`
}

// Ping implements election.Pinger.
func (p HTTPPinger) Ping(ctx context.Context, serverID string, control coord.Endpoint) (election.PingReply, error) {
	var no election.PingReply
	address := control.Address
	if err := validHostPort(address); err != nil {
		return no, fmt.Errorf("server: ping %q: %w", address, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, control.PeerURL()+"/friend/ping", nil)
	if err != nil {
		return no, err
	}
	cli := p.Client
	if cli == nil {
		cli = http.DefaultClient
	}
	resp, err := cli.Do(req)
	if err != nil {
		return no, fmt.Errorf("server: ping %s: %w", address, err)
	}
	defer resp.Body.Close()
	var r struct {
		Success bool       `json:"success"`
		Data    pingAnswer `json:"data"`
		Message string     `json:"message"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&r); err != nil {
		return no, fmt.Errorf("server: ping %s: %w", address, err)
	}
	if !r.Success {
		return no, fmt.Errorf("server: ping %s: %s", address, r.Message)
	}
	if r.Data.ServerID != serverID {
		return no, fmt.Errorf("server: ping %s: answered by server %q, not %q", address, r.Data.ServerID, serverID)
	}
	if err := r.Data.Protocols.Validate(); err != nil {
		return no, fmt.Errorf("server: ping %s: %w", address, err)
	}
	return election.PingReply{Protocols: r.Data.Protocols, Unconfirmed: r.Data.Unconfirmed}, nil
}
