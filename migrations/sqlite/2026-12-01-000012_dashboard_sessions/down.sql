DROP TABLE eco_login_links;
DROP TABLE eco_dashboard_sessions;
